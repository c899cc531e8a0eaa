"""The table a scan writes, ``DIR/rows/part-*.parquet``, and what a rerun reads back from it (pyarrow only: the
report and other readers never need Ray).

A part is appended only after its images' maps are on disk, and is written to a temporary name and renamed, so a
row exists only when its files do and a killed job leaves whole parts. Part names sort by run, then by order within
the run: ``part-<run id>-<sequence>.parquet``.

Columns (one row per input and run; JSON columns are strings):

- ``path``: the input: an absolute local path or a URI (the row's key).
- ``sha256``: hex sha256 of the input's bytes; null when they could not be read.
- ``width``, ``height``: original size in pixels; null when not decoded.
- ``score``: image-level score: the bundle detector's calibrated probability that the image is manipulated (for a
  bundle without a detector: the mean of the top 0.5 % pixel probabilities); ``decision``: score >= the bundle's
  threshold (manipulated); ``manipulated_fraction``: share of pixels the mask marks (at the model's resolution; 0
  when the decision says authentic and ``--follow-decision`` was given); ``members``: ensemble members averaged;
  ``copy_move_fraction``: share of pixels the bundle's copy-move cue marks (null without the cue).
- ``backend``, ``steps``, ``ensemble``, ``seed``: how the row was computed; ``bundle_sha256s``: JSON
  {graph: sha256} of the bundle's fp32 graphs.
- ``timings_ms``: JSON {stage: ms}: read, decode, preprocess, encoder, unet_steps, decoder, postprocess, write.
- ``outputs``: JSON {kind: path relative to DIR} for mask, prob, overlay and, asked for, uncertainty (``{}`` on
  error).
- ``error``: one line naming the input and the reason; null when the input was localized.
- ``error_kind``: null, ``input`` (the bytes are not a usable image: the same bytes fail again, so a rerun skips
  them), ``read`` (could not be read: retried by a rerun) or ``run`` (localizing or writing failed: retried).
- ``run_id``: the run that wrote the row; ``scanned_at``: when (UTC).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
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
])
COLUMNS = tuple(SCHEMA.names)
FINAL_ERROR_KINDS = (None, "input")  # rows a rerun does not compute again (for the same bytes)


def part_files(out_dir: str | Path) -> list[Path]:
    """The table's parts in the order they were written (hidden temporaries of a killed write excluded)."""
    return sorted((Path(out_dir) / ROWS_DIR).glob("part-*.parquet"))


def read_all_rows(out_dir: str | Path) -> pa.Table:
    """Every row of every part, oldest first, including rows a later run superseded."""
    parts = []
    for path in part_files(out_dir):
        try:
            parts.append(_conform(pq.read_table(path)))
        except (OSError, pa.ArrowException) as exc:  # a part cut short (written before parts were fsynced)
            log.warning("%s: unreadable table part skipped; its inputs will be scanned again (%s)", path, exc)
    return pa.concat_tables(parts) if parts else SCHEMA.empty_table()


def _conform(table: pa.Table) -> pa.Table:
    """SCHEMA's columns in its order; a column an older part lacks is null (the table may gain columns)."""
    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in SCHEMA]
    return pa.table(columns, names=list(COLUMNS)).cast(SCHEMA)


def read_scan_table(out_dir: str | Path) -> list[dict[str, Any]]:
    """The scan's rows, the newest per path (an input scanned again after its bytes changed, or retried after a
    failure, keeps only its latest row), in the order they were written. Each row is a dict of the columns in this
    module's docstring; JSON columns stay strings (``json.loads(row["outputs"])``)."""
    rows = read_all_rows(out_dir).to_pylist()
    newest = {row["path"]: i for i, row in enumerate(rows)}
    return [rows[i] for i in sorted(newest.values())]


def done_index(out_dir: str | Path) -> dict[str, str]:
    """{path: sha256} of the inputs whose newest row is final: localized, or refused for its content. A rerun skips
    an input whose bytes still have that sha256."""
    return {r["path"]: r["sha256"] for r in read_scan_table(out_dir)
            if r["sha256"] and r["error_kind"] in FINAL_ERROR_KINDS}


def write_part(out_dir: str | Path, rows: pa.Table, run_id: str, sequence: int) -> Path:
    """Append ``rows`` (SCHEMA's columns) as one new part, written to a temporary name and renamed."""
    folder = Path(out_dir) / ROWS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{run_id}-{sequence:06d}.parquet"
    with atomic_path(path, durable=True) as tmp:  # a rerun trusts the parts it finds: whole or absent
        pq.write_table(_conform(rows), tmp)
    return path


def outputs_of(row: dict[str, Any]) -> dict[str, str]:
    """A row's {kind: path relative to the scan folder}."""
    return json.loads(row["outputs"] or "{}")
