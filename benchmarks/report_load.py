"""``bench report``: how a report of many rows is written and opened. A scan table of N synthetic rows (no maps:
thumbnails are made once per image and are not what grows with N) is written as the scan writes it; the report is
made from it, then opened in headless Chromium until its first screen of rows is drawn."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def synthetic_table(folder: Path, rows: int, seed: int = 0) -> None:
    """``rows`` localized inputs (one in 50 failed) as one compacted part of a scan table, and its scan.json."""
    import pyarrow as pa

    from diffiml.files import write_text_atomic
    from diffiml.runtime.scan.table import COMPACTED_SUFFIX, SCHEMA, write_part

    rng = np.random.default_rng(seed)
    score = rng.random(rows)
    failed = rng.random(rows) < 0.02
    paths = [f"/data/photos/{i // 1000:04d}/img_{i:07d}.jpg" for i in range(rows)]
    columns = {"path": paths, "path_bytes": [p.encode() for p in paths], "sha256": ["ab" * 32] * rows,
               "width": np.full(rows, 1024, np.int32), "height": np.full(rows, 768, np.int32),
               "score": np.where(failed, np.nan, score), "decision": score > 0.9,
               "manipulated_fraction": score / 10, "members": np.full(rows, 5, np.int32),
               "outputs": [f'{{"mask": "maps/{i % 256:02x}/img_{i:07d}_mask.png"}}' for i in range(rows)],
               "error": [f"{p}: not an image" if f else None for p, f in zip(paths, failed, strict=True)],
               "error_kind": ["input" if f else None for f in failed]}
    table = pa.table({name: columns.get(name, pa.nulls(rows, SCHEMA.field(name).type)) for name in SCHEMA.names},
                     schema=SCHEMA)
    table = table.set_column(SCHEMA.get_field_index("score"), "score",
                             pa.array(np.where(failed, None, score), pa.float64(), mask=failed))
    write_part(folder, table, "bench", 0, COMPACTED_SUFFIX)
    write_text_atomic(folder / "scan.json", '{"bundle": "engines/default", "steps": 8, "ensemble": 5}\n')


def bench_report(work: Path, rows: int, loads: int = 3) -> dict:
    """The report of ``rows`` synthetic rows: written by ``diffiml report``'s function in a fresh process (its time
    and peak resident memory, the table's making apart), then opened in Chromium."""
    import json
    import textwrap

    from diffiml.benchmarks.memory import run_child
    from diffiml.runtime.report.writer import REPORT_NAME, ROWS_DIR

    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "rows", ignore_errors=True)
    synthetic_table(work, rows)
    written = json.loads(run_child(textwrap.dedent(f"""
        import json, time
        from diffiml.runtime.report.writer import write_report
        t0 = time.perf_counter()
        write_report({str(work)!r})
        print(json.dumps({{"s": time.perf_counter() - t0, "peak_kib": peak_kib()}}))
    """)).strip().splitlines()[-1])
    page = work / REPORT_NAME
    row_files = list((work / ROWS_DIR).glob("*.js"))
    return {"rows": rows, "write_s": round(written["s"], 1), "writer_peak_rss_mib": round(written["peak_kib"] / 1024),
            "page_kib": round(page.stat().st_size / 1024, 1), "row_files": len(row_files),
            "row_files_mib": round(sum(f.stat().st_size for f in row_files) / 2**20, 1),
            **first_screen(page, loads)}


def first_screen(page: Path, loads: int) -> dict:
    """Milliseconds from navigation to the first screen of rows drawn (median of ``loads`` fresh tabs), and to the
    last page's."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise RuntimeError("bench report needs Chromium on PATH (apt-get install chromium)")
    first, last = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_FLAGS)
        for _ in range(loads):
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            tab = context.new_page()
            t0 = time.perf_counter()
            tab.goto(page.as_uri(), wait_until="commit")
            tab.wait_for_function("document.body && document.body.dataset.series === 'ranked'", polling=10)
            first.append((time.perf_counter() - t0) * 1000)
            pages = tab.evaluate("Math.ceil(JSON.parse(document.getElementById('report-data').textContent)"
                                 ".counts.ranked / 100)")
            t0 = time.perf_counter()
            tab.evaluate(f"location.hash = 'page={pages}'")
            tab.wait_for_function(f"document.body.dataset.page === '{pages}'", polling=10)
            last.append((time.perf_counter() - t0) * 1000)
            context.close()
        browser.close()
    return {"first_screen_ms": round(statistics.median(first)), "last_page_ms": round(statistics.median(last))}
