"""The table a scan writes, ``DIR/rows/part-*.parquet``, and what a rerun reads back from it (pyarrow only: the
report and other readers never need Ray).

A part is appended only after its images' maps are on disk, and is written to a temporary name and renamed, so a
row exists only when its files do and a killed job leaves whole parts. Part names sort by run, then by order within
the run: ``part-<run id>-<sequence>.parquet``.

Parts are written per flush (``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``, whichever first), and at the end of a run
``compact`` folds every part into one holding the newest row per input, so a million-row scan reads back a handful
of files. A rerun reads only the key columns (``done_index``).

Columns (one row per input and run; JSON columns are strings):

- ``path_bytes``: the row's key, the input as bytes: a local path as the file system names it (``os.fsencode``; a
  name need not be UTF-8), a URI as UTF-8. Absent in tables written before it: the key is then ``path`` in UTF-8.
- ``path``: the input as text, for people: an absolute local path or a URI; bytes that are not UTF-8 are shown
  escaped (``caf\\xe9.png``).
- ``sha256``: hex sha256 of the input's bytes; null when they could not be read. ``size``, ``mtime_ns``: the file's
  size and modification time when it was read (null for URIs and older tables): a rerun skips an input whose newest
  final row has the same path, size and mtime without reading it (``--verify`` re-hashes instead).
- ``width``, ``height``: original size in pixels; null when not decoded.
- ``score``: image-level score: the bundle detector's calibrated probability that the image is manipulated (for a
  bundle without a detector: the mean of the top 0.5 % pixel probabilities); ``decision``: score >= the bundle's
  threshold (manipulated); ``manipulated_fraction``: share of pixels the mask marks (at the model's resolution; 0
  when the decision says authentic and ``--follow-decision`` was given); ``members``: ensemble members averaged;
  ``copy_move_fraction``: share of pixels the bundle's copy-move cue marks (null without the cue).
- ``backend``, ``steps``, ``ensemble``, ``seed``: how the row was computed; ``bundle_id``: the bundle's identity
  (``Bundle.bundle_id``: the sha256 of its manifest, which names every graph's sha256 and the cue's and detector's
  settings); ``bundle_sha256s``: JSON {graph: sha256} of the bundle's fp32 graphs.
- ``timings_ms``: JSON {stage: ms}: read, decode, preprocess, encoder, unet_steps, decoder, postprocess, write.
- ``outputs``: JSON {kind: path relative to DIR} for mask, prob, overlay and, asked for, uncertainty (``{}`` on
  error); maps live in ``maps/XY/`` (XY: two hex digits of the key's hash), so no folder holds a million files.
- ``error``: one line naming the input and the reason; null when the input was localized.
- ``error_kind``: null, ``input`` (the bytes are not a usable image, or they stopped the worker that read them
  ``MAX_ATTEMPTS`` times: the same bytes fail again, so a rerun skips them), ``read`` (could not be read: retried by
  a rerun) or ``run`` (localizing or writing failed: retried).
- ``run_id``: the run that wrote the row; ``scanned_at``: when (UTC).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffiml.files import atomic_path

log = logging.getLogger(__name__)
ROWS_DIR = "rows"
SCHEMA = pa.schema([
    ("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("score", pa.float64()), ("decision", pa.bool_()), ("manipulated_fraction", pa.float64()), ("members", pa.int32()),
    ("copy_move_fraction", pa.float64()),
    ("backend", pa.string()), ("bundle_sha256s", pa.string()), ("steps", pa.int32()), ("ensemble", pa.int32()),
    ("seed", pa.int64()), ("timings_ms", pa.string()), ("outputs", pa.string()), ("error", pa.string()),
    ("error_kind", pa.string()), ("run_id", pa.string()), ("scanned_at", pa.timestamp("ms", tz="UTC")),
    ("path_bytes", pa.binary()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("bundle_id", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
FINAL_ERROR_KINDS = (None, "input")  # rows a rerun does not compute again (for the same bytes)


FLUSH_ROWS = 1024  # a part per this many rows, or per FLUSH_SECONDS, whichever comes first
FLUSH_SECONDS = 5.0
INDEX_COLUMNS = ("path_bytes", "sha256", "size", "mtime_ns")
COMPACTED_SUFFIX = "-compacted.parquet"  # a part holding the newest row per input (one row each)


def part_files(out_dir: str | Path) -> list[Path]:
    """The table's parts in the order they were written (hidden temporaries of a killed write excluded)."""
    return sorted((Path(out_dir) / ROWS_DIR).glob("part-*.parquet"))


def display_path(key: bytes) -> str:
    """An input's key as text: UTF-8 where it is, other bytes escaped (``caf\\xe9.png``)."""
    return key.decode("utf-8", "backslashreplace")


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    """One part conformed to SCHEMA (only ``columns`` when given), or None when it is unreadable (cut short)."""
    try:
        present = pq.read_schema(path).names
        wanted = None if columns is None else [c for c in columns if c in present]
        table = pq.read_table(path, columns=wanted)
        if columns is not None and "path_bytes" in columns and (
                "path_bytes" not in present or table.column("path_bytes").null_count):
            table = table.append_column("path", pq.read_table(path, columns=["path"]).column("path"))
        return _conform(table, columns)
    except (OSError, pa.ArrowException) as exc:  # a part cut short (written before parts were fsynced)
        log.warning("%s: unreadable table part skipped; its inputs will be scanned again (%s)", path, exc)
        return None


def read_all_rows(out_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every row of every part, oldest first, including rows a later run superseded."""
    parts = [t for t in (_read_part(p, columns) for p in part_files(out_dir)) if t is not None]
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _read_newest(out_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The newest row per input. A table that is one compacted part has one row per input already: read as is
    (grouping a million keys would double the memory of a rerun's index)."""
    parts = part_files(out_dir)
    table = read_all_rows(out_dir, columns)
    if len(parts) == 1 and parts[0].name.endswith(COMPACTED_SUFFIX):
        return table
    return _newest(table)


def _conform(table: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """SCHEMA's columns (or ``columns``) in its order; a column an older part lacks is null (the table may gain
    columns), except the key, which older parts had as ``path``."""
    names = list(COLUMNS) if columns is None else list(columns)
    out = []
    for name in names:
        field = SCHEMA.field(name)
        if name == "path_bytes":  # null where a writer gave only the text (UTF-8 names, older parts)
            given = table.column(name) if name in table.column_names else None
            if given is None or given.null_count:
                from_text = pc.cast(table.column("path"), pa.binary())
                given = from_text if given is None else pc.if_else(pc.is_valid(given), given, from_text)
            out.append(given)
        elif name in table.column_names:
            out.append(table.column(name))
        else:
            out.append(pa.nulls(table.num_rows, field.type))
    return pa.table(out, names=names).cast(pa.schema([SCHEMA.field(n) for n in names]))


def _last_per_key(keys: pa.Table) -> pa.Array:
    """Row numbers of the last row per ``path_bytes`` in ``keys``, ascending (the order they were written)."""
    order = keys.select(["path_bytes"]).append_column("_order", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
    last = order.group_by("path_bytes", use_threads=False).aggregate([("_order", "max")]).column("_order_max")
    return pc.take(last, pc.sort_indices(last))


def _newest(table: pa.Table) -> pa.Table:
    """The newest row per key, in the order the rows were written."""
    return table.take(_last_per_key(table)) if table.num_rows else table


def read_scan_table(out_dir: str | Path) -> list[dict[str, Any]]:
    """The scan's rows, the newest per input (an input scanned again after its bytes changed, or retried after a
    failure, keeps only its latest row), in the order they were written. Each row is a dict of the columns in this
    module's docstring; JSON columns stay strings (``json.loads(row["outputs"])``)."""
    return _read_newest(out_dir).to_pylist()


def newest_rows(out_dir: str | Path) -> pa.Table:
    """``read_scan_table`` as a pyarrow table: what the report ranks and pages without a Python object per row."""
    return _read_newest(out_dir)


def done_index(out_dir: str | Path) -> pa.Table:
    """``INDEX_COLUMNS`` of the inputs whose newest row is final (localized, or refused for its content), read as
    columns from the parts: a rerun skips an input with the same key, size and mtime, or whose bytes still have that
    sha256. A million rows take about 100 MB here, not Python objects per row."""
    table = _read_newest(out_dir, [*INDEX_COLUMNS, "error_kind"])
    final = pc.and_(pc.is_valid(table.column("sha256")),
                    pc.or_kleene(pc.is_null(table.column("error_kind")),
                                 pc.is_in(table.column("error_kind"), pa.array([k for k in FINAL_ERROR_KINDS if k]))))
    return table.filter(final).select(list(INDEX_COLUMNS))


def write_part(out_dir: str | Path, rows: pa.Table, run_id: str, sequence: int, suffix: str = "") -> Path:
    """Append ``rows`` (SCHEMA's columns) as one new part, written to a temporary name and renamed."""
    folder = Path(out_dir) / ROWS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{run_id}-{sequence:06d}{suffix}.parquet"
    with atomic_path(path, durable=True) as tmp:  # a rerun trusts the parts it finds: whole or absent
        pq.write_table(_conform(rows), tmp)
    return path


def compact(out_dir: str | Path, run_id: str) -> Path | None:
    """Fold every part into one holding the newest row per input (named to sort after them), then delete the
    others. Streamed part by part, so memory holds the key columns and one part, not the table. A kill at any point
    leaves either the old parts, or the new one beside some old ones: its rows are the newest either way."""
    parts = part_files(out_dir)
    if len(parts) <= 1:
        return parts[0] if parts else None
    keys = []
    for i, path in enumerate(parts):
        table = _read_part(path, ["path_bytes"])
        if table is not None:
            keys.append(table.append_column("_part", pa.array(np.full(table.num_rows, i, np.int32)))
                        .append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64))))
    if not keys:
        return None
    index = pa.concat_tables(keys)
    keep = index.take(_last_per_key(index))
    folder = Path(out_dir) / ROWS_DIR
    target = folder / f"part-{run_id}-999999{COMPACTED_SUFFIX}"
    with atomic_path(target, durable=True) as tmp:
        writer = pq.ParquetWriter(tmp, SCHEMA)
        try:
            for i, path in enumerate(parts):
                rows = pc.filter(keep.column("_row"), pc.equal(keep.column("_part"), i))
                if len(rows):
                    table = _read_part(path)
                    if table is not None:
                        writer.write_table(table.take(rows))
        finally:
            writer.close()
    for path in parts:
        if path != target:
            path.unlink(missing_ok=True)
    return target
