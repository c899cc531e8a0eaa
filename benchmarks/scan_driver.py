"""``diffiml bench scan-driver``: what a scan's driver costs before Ray sees an input, at a million inputs.

Maps are not needed to measure the index, so the table is synthetic: N empty input files (in folders of 1000, named
by one list file) and a scan table holding a final row for each, written as a run writes it (parts of
``FLUSH_ROWS`` rows) and compacted as a run ends. Then, in a fresh process, the skip pass of a rerun:
reading the list, ``done_index`` (the table's key columns), and ``plan_work`` (a stat per input, joined with the
index). Reported: each stage's seconds and the process's peak resident memory; and the compaction's seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def make_inputs(root: Path, n: int) -> Path:
    """N empty files under ``root/in/DDDD/`` and ``root/list.txt`` naming them (kept between runs of the bench)."""
    listing = root / "list.txt"
    if listing.is_file() and sum(1 for _ in listing.open()) == n:
        return listing
    names = []
    for i in range(n):
        folder = root / "in" / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:07d}.png"
        path.touch()
        names.append(str(path))
    listing.write_text("\n".join(names) + "\n")
    return listing


def make_table(root: Path, listing: Path) -> tuple[Path, float]:
    """A scan folder whose table has one final row per listed input, in FLUSH_ROWS-row parts; then compacted.
    Returns the folder and the compaction's seconds."""
    import pyarrow as pa

    from diffiml.runtime.scan.inputs import input_key
    from diffiml.runtime.scan.table import FLUSH_ROWS, SCHEMA, compact, write_part

    out = root / "scan"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    paths = listing.read_text().split()
    for part, start in enumerate(range(0, len(paths), FLUSH_ROWS)):
        chunk = paths[start : start + FLUSH_ROWS]
        stats = [os.stat(p) for p in chunk]
        write_part(out, pa.table({
            "path": chunk, "path_bytes": [input_key(p) for p in chunk], "sha256": [f"{i:064x}" for i in range(
                start, start + len(chunk))], "size": [s.st_size for s in stats],
            "mtime_ns": [s.st_mtime_ns for s in stats], "score": [0.5] * len(chunk), "steps": [8] * len(chunk),
            "outputs": ['{"mask": "maps/ab/x_mask.png"}'] * len(chunk), "run_id": ["bench"] * len(chunk),
        }).cast(pa.schema([SCHEMA.field(n) for n in ("path", "path_bytes", "sha256", "size", "mtime_ns", "score",
                                                     "steps", "outputs", "run_id")])), "bench", part)
    t0 = time.perf_counter()
    compact(out, "bench")
    return out, time.perf_counter() - t0


_SKIP_PASS = """
import json, resource, sys, time
t0 = time.perf_counter()
from diffiml.runtime.scan.driver import plan_work
from diffiml.runtime.scan.inputs import list_inputs
from diffiml.runtime.scan.table import done_index
t1 = time.perf_counter()
inputs = list_inputs([sys.argv[1]])
t2 = time.perf_counter()
done = done_index(sys.argv[2])
t3 = time.perf_counter()
work, skipped = plan_work(inputs, done)
t4 = time.perf_counter()
print(json.dumps({"inputs": len(inputs), "skipped": skipped, "to_compute": work.num_rows,
                  "import_s": round(t1 - t0, 2), "list_s": round(t2 - t1, 2), "done_index_s": round(t3 - t2, 2),
                  "plan_work_s": round(t4 - t3, 2), "skip_pass_s": round(t4 - t1, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def bench_scan_driver(root: Path, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    listing = make_inputs(root, n)
    made = time.perf_counter() - t0
    out, compact_s = make_table(root, listing)
    done = subprocess.run([sys.executable, "-c", _SKIP_PASS, str(listing), str(out)], capture_output=True, text=True,
                          check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rows": n, **row, "compact_s": round(compact_s, 2), "setup_s": round(made, 1)}


# The columns its report shows, in order.
SHOWN = ("rows", "skipped", "to_compute", "list_s", "done_index_s", "plan_work_s", "skip_pass_s", "peak_rss_mib",
         "compact_s")
