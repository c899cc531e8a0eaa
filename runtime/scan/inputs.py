"""What ``diffiml scan`` reads: files, folders and globs (as ``localize`` expands them), URIs that pyarrow can open
(``s3://``, ``gs://``, ``hdfs://``, ``file://``), and list files naming either, so a cluster can scan shared or
object storage.

Every input becomes one string: an absolute local path, or the URI as given. Its bytes (``input_key``) are the key
of its row in the scan table: a local name need not be UTF-8 (Python carries such bytes as surrogate escapes, Arrow
as binary), and a rerun finds its earlier rows by them, so the same file named as ``photos/a.png`` from two working
folders is still one row.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from pathlib import Path

from diffiml.runtime.errors import DiffimlError

LIST_SUFFIXES = (".txt", ".csv", ".parquet")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


def list_inputs(specs: list[str]) -> list[str]:
    """The inputs in the order given, each once. A ``.txt`` (one path per line; blank lines and ``#`` comments
    skipped), ``.csv`` or ``.parquet`` (a ``path`` column) is a list of inputs; relative entries are relative to the
    list's folder. A missing file stays in the list: its row will say so."""
    from diffiml.runtime.options import expand_inputs

    found: list[str] = []
    for spec in specs:
        if spec.lower().endswith(LIST_SUFFIXES):
            found += _read_list(spec)
        elif is_uri(spec):
            found.append(spec)
        else:
            found += [os.path.abspath(p) for p in expand_inputs([spec])]
    return list(dict.fromkeys(found))


def _read_list(spec: str) -> list[str]:
    """The entries of one list file, each made absolute against the list's own folder (or URI)."""
    try:
        data = _read_bytes(spec)
    except OSError as exc:
        raise DiffimlError(f"{spec}: cannot read the input list ({exc})") from None
    suffix = Path(spec.lower()).suffix
    if suffix == ".txt":
        # A name that is not UTF-8 stays the file system's bytes (surrogate escapes), as os.listdir gives it.
        entries = [line.strip() for line in data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
                   .splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        if "path" not in (reader.fieldnames or []):
            raise DiffimlError(f"{spec}: a CSV input list needs a 'path' column (it has {reader.fieldnames})")
        entries = [row["path"].strip() for row in reader if (row["path"] or "").strip()]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as exc:
            raise DiffimlError(f"{spec}: not a readable Parquet input list ({exc})") from None
        if "path" not in table.column_names:
            raise DiffimlError(f"{spec}: a Parquet input list needs a 'path' column (it has {table.column_names})")
        entries = [str(p) for p in table.column("path").to_pylist() if p]
    return [_absolute(e, spec) for e in entries]


def _absolute(entry: str, list_spec: str) -> str:
    if is_uri(entry):
        return entry
    if os.path.isabs(entry):
        return os.path.abspath(entry)
    if is_uri(list_spec):
        return posixpath.join(posixpath.dirname(list_spec), entry)
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(list_spec)), entry))


def open_filesystem(source: str):  # noqa: ANN201 - (pyarrow.fs.FileSystem, path inside it)
    """The pyarrow filesystem holding ``source`` (a local path or a URI) and the path inside it."""
    import pyarrow.fs as pafs

    if is_uri(source):
        return pafs.FileSystem.from_uri(source)
    return pafs.LocalFileSystem(), source


def _read_bytes(source: str) -> bytes:
    import pyarrow as pa

    fs, path = open_filesystem(source)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except pa.ArrowException as exc:
        raise OSError(str(exc)) from None


def input_key(source: str) -> bytes:
    """The row key of an input: a local path's bytes as the file system has them, a URI's UTF-8."""
    return source.encode("utf-8") if is_uri(source) else os.fsencode(source)


def source_of(key: bytes) -> str:
    """The input a row key names (``input_key``'s inverse)."""
    return os.fsdecode(key)


def map_stem(source: str) -> tuple[str, str]:
    """(shard folder, file-name stem) of an input's maps: its own stem (bytes that are not UTF-8 replaced by ``_``),
    then the first 10 hex digits of the sha256 of its row key, so ``a/x.png`` and ``b/x.png`` never write over each
    other's maps; the shard is the first two of those digits (256 folders under ``maps/``)."""
    import hashlib

    name = posixpath.basename(source.rstrip("/")) if is_uri(source) else os.path.basename(source)
    stem = os.fsencode(os.path.splitext(name)[0]).decode("utf-8", "replace").replace("\ufffd", "_") or "input"
    digest = hashlib.sha256(input_key(source)).hexdigest()
    return digest[:2], f"{stem}_{digest[:10]}"
