"""``diffiml scan``: localize a large set of images on Ray Data, locally or on a cluster, resumable.

Pipeline: the inputs' bytes and sha256 are read by Ray tasks; decoding, localizing and writing the maps run in a
pool of actors, each holding one opened bundle. The driver consumes the actors' output batch by batch and appends
the rows to ``DIR/rows`` as Parquet parts (every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``), after their maps are on
disk, so a row exists only when its files do; the parts are compacted into one at the end of the run.

A rerun with the same ``--out`` first reads the table's key columns (not its rows) and skips, without reading them,
the inputs whose newest row is final for the same path, size and mtime (``--verify``: re-hash them, and skip only
the same bytes); the rest go to Ray. A killed job loses at most the rows not yet flushed. One scan writes to a folder
at a time (``DIR/.scan.lock``).

Ray is imported only inside the functions here (``pip install 'diffiml[scan]'``); the runtime imports without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffiml.files import exclusive_lock, write_text_atomic
from diffiml.runtime.errors import DiffimlError
from diffiml.runtime.scan.cluster import DEFAULT_BATCH, READ_CPUS, Layout, check_counts, choose_layout, connect

log = logging.getLogger(__name__)
# Settings that change a row's result: a rerun into the same folder must use the same ones.
# What a rerun must share with the rows already there: the cue's and the detector's own settings (a re-export with
# other ones changes rows as much as other graphs do) and the OpenCV version (the cue's keypoints depend on it).
IDENTITY = ("bundle_id", "bundle_sha256s", "backend", "precision", "steps", "ensemble", "adaptive", "tta", "seed",
            "uncertainty", "copy_move_cue", "cue_settings", "detector_sha256", "follow_decision", "opencv")


@dataclass
class ScanSummary:
    inputs: int
    localized: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Images computed (localized or failed) per second of this run; skipped ones do not count."""
        return (self.localized + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"diffiml scan: {self.inputs} images, {self.localized} localized, {self.failed} failed (errors in the "
                f"table), {self.skipped} skipped (already done), {self.rate:.1f} img/s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from diffiml.runtime.options import DEFAULT_BUNDLE, add_localizer_options

    p = sub.add_parser("scan", help="localize many images on Ray Data (local or a cluster), resumable, into a table")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, globs, URIs, or lists of them (.txt; .csv or .parquet with a path "
                        "column)")
    p.add_argument("--out", required=True, help="output folder: rows/part-*.parquet, maps/*.png, scan.json")
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"engine bundle folder (default {DEFAULT_BUNDLE})")
    add_localizer_options(p)
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (default: $RAY_ADDRESS, else a local Ray started for this scan)")
    p.add_argument("--actors", type=int, default=None, help="Localizer actors (default: from the cluster's CPUs/GPUs)")
    p.add_argument("--threads-per-actor", type=int, default=None, help="onnxruntime threads per actor")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per actor call and table part "
                                                                 f"(default {DEFAULT_BATCH})")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the inputs done before instead of trusting their size and mtime")
    p.add_argument("--report", action="store_true", help="write the HTML report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=scan)


def scan_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every row is computed with, checked here (bundle verified, step count and precision present) so a bad
    bundle is one line before Ray starts."""
    import cv2

    from diffiml.runtime.bundle import load_bundle
    from diffiml.runtime.localizer import parse_ensemble
    from diffiml.runtime.options import adaptive_policy, apply_fast

    apply_fast(args)
    bundle = load_bundle(args.bundle)
    steps = args.steps or bundle.default_steps
    bundle.plan(steps)
    bundle.graph(bundle.unet_graph(steps), args.precision)
    n, adaptive = parse_ensemble(args.ensemble, bundle.default_ensemble, adaptive_policy(args))
    if n < 1:
        raise DiffimlError(f"--ensemble must be >= 1, got {n}")
    return {"bundle": str(Path(args.bundle).resolve()), "bundle_id": bundle.bundle_id,
            "bundle_sha256s": bundle.sha256s, "backend": args.backend,
            "precision": args.precision, "steps": steps, "ensemble": n,
            "adaptive": None if adaptive is None else adaptive.tolerance, "ensemble_spec": args.ensemble,
            "tta": bool(args.tta), "seed": args.seed, "uncertainty": bool(args.uncertainty),
            "copy_move_cue": bool(args.copy_move and bundle.copy_move_cue is not None),
            "cue_settings": bundle.manifest.get("copy_move_cue") if args.copy_move else None,
            "detector_sha256": _entry_sha256(bundle.manifest.get("detector")),
            "follow_decision": bool(args.follow_decision), "opencv": cv2.__version__}


def _entry_sha256(entry: Any) -> str | None:
    """A manifest entry's identity: the sha256 of its canonical JSON (None when absent)."""
    if entry is None:
        return None
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_work(inputs: list[str], done: Any, verify: bool = False) -> tuple[Any, int]:
    """(work, skipped): the inputs to send to Ray as a table (path_bytes, done_sha256), in the order given, and how
    many were skipped for a final row of the same key, size and mtime. ``done``: ``table.done_index``. Local
    files are stat'ed here (about 5 us each); URIs always go to the read stage, which skips them by sha256."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from diffiml.runtime.scan.inputs import input_key, is_uri

    sizes = np.full(len(inputs), -1, np.int64)
    mtimes = np.full(len(inputs), -1, np.int64)
    if not verify:
        for i, source in enumerate(inputs):
            if not is_uri(source):
                try:
                    st = os.stat(source)
                except OSError:
                    continue
                sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    try:  # UTF-8 names (nearly all): one Arrow copy of the strings, its bytes the keys
        keys = pa.array(inputs, pa.string()).cast(pa.binary())
    except (UnicodeEncodeError, pa.ArrowException):  # some name is not UTF-8: each one's own bytes
        keys = pa.array([input_key(p) for p in inputs], pa.binary())
    found = pc.index_in(keys, value_set=done.column("path_bytes").combine_chunks())  # row in done, or null
    done_size, done_mtime, done_sha = (pc.take(done.column(c), found) for c in ("size", "mtime_ns", "sha256"))
    same = pc.and_(pc.equal(pa.array(sizes), done_size), pc.equal(pa.array(mtimes), done_mtime))
    same = pc.and_(pc.fill_null(same, False), pa.array(sizes >= 0))
    work = pa.table({"path_bytes": keys, "done_sha256": done_sha}).filter(pc.invert(same))
    return work, len(inputs) - work.num_rows


def run_scan(inputs: list[str], out: Path, settings: dict[str, Any], layout: Layout, progress: bool = True,
             on_batch: Callable[[int], None] | None = None, verify: bool = False) -> ScanSummary:
    """Scan ``inputs`` into ``out`` on the connected Ray; returns the counts. Needs ``ray.init`` done.
    ``on_batch(rows)`` is called after each batch is taken in (benchmarks time the steady state with it)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data  # configures Ray Data's loggers, which the lines below quiet
    from tqdm import tqdm

    from diffiml.runtime.scan.table import FLUSH_ROWS, FLUSH_SECONDS, compact, done_index, write_part
    from diffiml.runtime.scan.worker import ScanWorker, read_batch

    summary = ScanSummary(inputs=len(inputs))
    work, planned_skips = plan_work(inputs, done_index(out), verify)
    summary.skipped = planned_skips
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's notices stay in its log file, off the terminal
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.CRITICAL)  # a failure is our one line (-v: Ray's traceback)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours, over images
    ctx.print_on_execution_start = False
    seen = 0
    pending: list[pa.Table] = []
    flushed = [time.monotonic(), 0]  # when, and how many parts so far

    def flush() -> None:
        if pending:
            write_part(out, pa.concat_tables(pending), settings["run_id"], flushed[1])
            pending.clear()
            flushed[1] += 1
        flushed[0] = time.monotonic()

    t0 = time.perf_counter()
    bar = tqdm(total=len(inputs), initial=summary.skipped, desc="scan", unit="img", file=sys.stderr,
               disable=not progress)
    try:
        if work.num_rows:
            size = layout.batch_size
            per_block = max(size, -(-work.num_rows // 10_000))  # a batch per block, at most 10 000 blocks
            blocks = [work.slice(i, per_block) for i in range(0, work.num_rows, per_block)]
            ds = ray.data.from_arrow(blocks).map_batches(
                read_batch, batch_size=size, batch_format="pyarrow", num_cpus=READ_CPUS)
            ds = ds.map_batches(ScanWorker, batch_size=size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=layout.actors),
                                fn_constructor_kwargs={"settings": {**settings, "threads": layout.threads},
                                                       "maps_dir": str(out.resolve() / "maps")},
                                num_cpus=layout.actor_cpus, num_gpus=layout.actor_gpus or None)
            # Ray Data's actor pools restart a dead actor and run its batches again (max_restarts=-1 by default); an
            # input that keeps killing its actor is stopped by the worker's own count (worker.MAX_ATTEMPTS).
            # prefetch_batches=0: a batch reaches the table as soon as its actor is done.
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                fresh = batch.filter(pc.invert(batch.column("skip"))).drop_columns(["skip"])
                if fresh.num_rows:
                    pending.append(fresh)
                if sum(t.num_rows for t in pending) >= FLUSH_ROWS or time.monotonic() - flushed[0] >= FLUSH_SECONDS:
                    flush()
                fine = fresh.column("error").null_count
                summary.localized += fine
                summary.failed += fresh.num_rows - fine
                summary.skipped += batch.num_rows - fresh.num_rows
                seen += batch.num_rows
                bar.update(batch.num_rows)
                bar.set_postfix(failed=summary.failed, skipped=summary.skipped, refresh=False)
                if on_batch is not None:
                    on_batch(batch.num_rows)
        flush()
        compact(out, settings["run_id"])
    except ray.exceptions.RayError as exc:
        flush()
        raise DiffimlError(f"the Ray job stopped after {planned_skips + seen} of {len(inputs)} inputs: "
                           f"{_cause(exc)} (the rows so far are kept; a rerun into the same --out does the rest)"
                           ) from None
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
    if seen < work.num_rows:  # rare (a batch Ray dropped): name the inputs that have no row from this run
        from diffiml.runtime.scan.table import display_path, read_all_rows

        rows = read_all_rows(out, ["path_bytes", "run_id"])
        ours = rows.filter(pc.equal(rows.column("run_id"), settings["run_id"])).column("path_bytes")
        lost = work.filter(pc.invert(pc.is_in(work.column("path_bytes"), value_set=ours.combine_chunks())))
        summary.missing = [display_path(k) for k in lost.column("path_bytes").to_pylist()]
    return summary


def _cause(exc: BaseException) -> str:
    """The root error of a Ray failure, as one line: the exception a task or actor raised (Ray keeps it as
    ``cause``), else the first line of Ray's own message, without colors."""
    import re

    seen = set()
    while getattr(exc, "cause", None) is not None and id(exc) not in seen:  # RayTaskError wraps the user's error
        seen.add(id(exc))
        exc = exc.cause  # type: ignore[attr-defined]
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Traceback", "File ", "ray::"))]
    text, name = (lines[0] if lines else ""), type(exc).__name__
    return (text if text.startswith(name) else f"{name}: {text}" if text else name)[:300]


def _record(out: Path, settings: dict[str, Any], layout: Layout, address: str | None, run: dict[str, Any]) -> None:
    """``DIR/scan.json``: the scan's settings (which a rerun must share) and one entry per run; written atomically."""
    path = out / "scan.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    runs = [r for r in previous.get("runs", []) if r.get("run_id") != run["run_id"]] + [run]
    record = {"format": 1, **{k: v for k, v in settings.items() if k not in ("ensemble_spec", "run_id")},
              **asdict(layout), "address": address or "local", "table": "rows", "maps": "maps", "runs": runs}
    write_text_atomic(path, json.dumps(record, indent=2))


def _check_same_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / "scan.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffimlError(f"{path}: unreadable ({exc}); use another --out") from None
    changed = [k for k in IDENTITY if before.get(k) != settings.get(k)]
    if changed:
        diffs = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise DiffimlError(f"{out} holds a scan made with other settings ({diffs}); rerun with the same settings "
                           "to resume it, or give another --out")


def scan(args: argparse.Namespace) -> int:
    from diffiml.runtime.options import output_folder
    from diffiml.runtime.scan.inputs import list_inputs

    check_counts(args.actors, args.threads_per_actor, args.batch_size)
    try:  # before anything is listed or created: without them nothing can run
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise DiffimlError("diffiml scan needs Ray Data and pyarrow: pip install 'diffiml[scan]'") from None
    settings = scan_settings(args)
    inputs = list_inputs(args.inputs)
    if not inputs:
        raise DiffimlError("no input images matched")
    out = output_folder(args.out)
    with exclusive_lock(out / ".scan.lock") as held:
        if not held:
            raise DiffimlError(f"{out}: another scan is writing to this folder (lock {out / '.scan.lock'}); wait for "
                               "it to end, or give another --out")
        return _scan_locked(args, out, settings, inputs)


def _scan_locked(args: argparse.Namespace, out: Path, settings: dict[str, Any], inputs: list[str]) -> int:
    _check_same_settings(out, settings)
    settings["run_id"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]
    started = connect(args.address)
    try:
        import ray

        layout = choose_layout(ray.cluster_resources(), args.backend, args.actors, args.threads_per_actor,
                               args.batch_size, len(inputs))
        run = {"run_id": settings["run_id"], "started": datetime.now(timezone.utc).isoformat(), "inputs": len(inputs)}
        address = args.address or os.environ.get("RAY_ADDRESS")
        _record(out, settings, layout, address, run)
        summary = run_scan(inputs, out, settings, layout, progress=not args.no_progress,
                           verify=getattr(args, "verify", False))
        run.update(finished=datetime.now(timezone.utc).isoformat(), localized=summary.localized,
                   failed=summary.failed, skipped=summary.skipped, seconds=round(summary.seconds, 3))
        _record(out, settings, layout, address, run)
    finally:
        if started:
            ray.shutdown()
    print(summary.line(), file=sys.stderr)
    print(json.dumps({"out": str(out), "inputs": summary.inputs, "localized": summary.localized,
                      "failed": summary.failed, "skipped": summary.skipped, "run_id": settings["run_id"]}))
    if args.report:
        from diffiml.runtime.report.writer import write_report

        print(f"diffiml scan: report {write_report(out)}", file=sys.stderr)
    if summary.missing:
        print(f"diffiml scan: {len(summary.missing)} inputs have no row (first: {summary.missing[0]}); run the same "
              "command again", file=sys.stderr)
        return 1
    return 0

