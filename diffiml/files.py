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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` with the same suffix (encoders choose the format by it) for the caller to
    write; renamed onto ``path`` when the block ends without error, removed otherwise. The name is unique, so two
    writers of one file never share a temporary."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
