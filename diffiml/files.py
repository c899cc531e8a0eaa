"""File helpers shared by training, export, runtime and benchmarks (plain Python: importing this never pulls in
torch). Every output of the project is written through ``atomic_path``: to a temporary name beside the target, then
renamed, so a kill never leaves a half-written file and a reader never sees one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints and engines can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status); otherwise by setting and
    restoring it (not thread-safe, hence the second choice)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` with the same suffix (encoders choose the format by it) for the caller to
    write; renamed onto ``path`` when the block ends without error, removed otherwise. The name is unique, so two
    writers of one file never share a temporary. The file gets the mode a plain ``open`` would give it (0666 less the
    umask; mkstemp's own is owner-only), so a shared output folder stays readable. ``durable``: the data reach the
    disk before the rename and the rename before return (fsync), so a power loss leaves the old file or the whole new
    one, never an empty one (for files a rerun trusts, such as a scan's table parts).

    Raise inside the block to abandon the write: a ``return`` would rename whatever the temporary holds."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_png_atomic(path: str | Path, array: object) -> Path:
    """An image array (OpenCV's channel order) as a PNG; OSError if OpenCV cannot write it."""
    import cv2

    with atomic_path(path) as tmp:
        try:
            written = cv2.imwrite(str(tmp), array)  # type: ignore[call-overload]
        except cv2.error as exc:
            raise OSError(f"{path}: could not be written ({str(exc).strip().splitlines()[-1][:120]})") from None
        if not written:
            raise OSError(f"{path}: could not be written")
    return Path(path)


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path`` (created if absent) for the block; yields False at once, without
    waiting, when another process holds it. The kernel drops the lock when its holder dies, so a killed writer never
    leaves a folder locked."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
