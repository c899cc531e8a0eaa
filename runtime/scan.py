"""``diffiml scan``: localize a large set of images on Ray Data, locally or on a cluster, resumable.

Pipeline: the inputs' bytes and sha256 are read by Ray tasks; decoding, localizing and writing the maps run in a
pool of actors, each holding one opened bundle. The driver consumes the actors' output batch by batch and appends
each batch to ``DIR/rows`` as one Parquet part, after its maps are on disk, so a row exists only when its files do.
A rerun with the same ``--out`` skips every input whose newest row is final for the same bytes (same path and
sha256) and computes the rest: a killed job loses at most the batches in flight.

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

from diffiml.files import write_text_atomic
from diffiml.runtime.errors import DiffimlError
from diffiml.runtime.scan_cluster import DEFAULT_BATCH, READ_CPUS, Layout, check_counts, choose_layout, connect

log = logging.getLogger(__name__)
# Settings that change a row's result: a rerun into the same folder must use the same ones.
# What a rerun must share with the rows already there: the cue's and the detector's own settings (a re-export with
# other ones changes rows as much as other graphs do) and the OpenCV version (the cue's keypoints depend on it).
IDENTITY = ("bundle_sha256s", "backend", "precision", "steps", "ensemble", "adaptive", "tta", "seed", "uncertainty",
            "copy_move_cue", "cue_settings", "detector_sha256", "follow_decision", "opencv")


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
    from diffiml.runtime.commands import DEFAULT_BUNDLE, add_copy_move_option, add_follow_decision_option

    p = sub.add_parser("scan", help="localize many images on Ray Data (local or a cluster), resumable, into a table")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders, globs, URIs, or lists of them (.txt; .csv or .parquet with a path "
                        "column)")
    p.add_argument("--out", required=True, help="output folder: rows/part-*.parquet, maps/*.png, scan.json")
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"engine bundle folder (default {DEFAULT_BUNDLE})")
    p.add_argument("--backend", default="auto", choices=["auto", "ort-cpu", "ort-cuda", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ensemble", default=None, metavar="N|auto[:N]")
    p.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--uncertainty", action="store_true", help="also write the ensemble's per-pixel spread")
    p.add_argument("--seed", type=int, default=0)
    add_copy_move_option(p)
    add_follow_decision_option(p)
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (default: $RAY_ADDRESS, else a local Ray started for this scan)")
    p.add_argument("--actors", type=int, default=None, help="Localizer actors (default: from the cluster's CPUs/GPUs)")
    p.add_argument("--threads-per-actor", type=int, default=None, help="onnxruntime threads per actor")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per actor call and table part "
                                                                 f"(default {DEFAULT_BATCH})")
    p.add_argument("--report", action="store_true", help="write the HTML report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=scan)


def scan_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every row is computed with, checked here (bundle verified, step count and precision present) so a bad
    bundle is one line before Ray starts."""
    import cv2

    from diffiml.runtime.bundle import load_bundle
    from diffiml.runtime.localizer import parse_ensemble

    bundle = load_bundle(args.bundle)
    steps = args.steps or bundle.default_steps
    bundle.plan(steps)
    bundle.graph("unet", args.precision)
    n, adaptive = parse_ensemble(args.ensemble, bundle.default_ensemble)
    if n < 1:
        raise DiffimlError(f"--ensemble must be >= 1, got {n}")
    return {"bundle": str(Path(args.bundle).resolve()), "bundle_sha256s": bundle.sha256s, "backend": args.backend,
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


def run_scan(inputs: list[str], out: Path, settings: dict[str, Any], layout: Layout, progress: bool = True,
             on_batch: Callable[[int], None] | None = None) -> ScanSummary:
    """Scan ``inputs`` into ``out`` on the connected Ray; returns the counts. Needs ``ray.init`` done.
    ``on_batch(rows)`` is called after each batch's part is written (benchmarks time the steady state with it)."""
    import pyarrow.compute as pc
    import ray
    import ray.data  # configures Ray Data's loggers, which the lines below quiet
    from tqdm import tqdm

    from diffiml.runtime.scan_table import done_index, write_part
    from diffiml.runtime.scan_worker import ScanWorker, read_batch

    done = done_index(out)
    summary = ScanSummary(inputs=len(inputs))
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's notices stay in its log file, off the terminal
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.CRITICAL)  # a failure is our one line (-v: Ray's traceback)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours, over images
    ctx.print_on_execution_start = False
    items = [{"path": p, "done_sha256": done.get(p)} for p in inputs]
    blocks = max(1, min(10_000, -(-len(items) // layout.batch_size)))
    worker_settings = {**settings, "threads": layout.threads}
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        read_batch, batch_size=layout.batch_size, batch_format="pyarrow", num_cpus=READ_CPUS)
    ds = ds.map_batches(ScanWorker, batch_size=layout.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=layout.actors),
                        fn_constructor_kwargs={"settings": worker_settings, "maps_dir": str(out.resolve() / "maps")},
                        num_cpus=layout.actor_cpus, num_gpus=layout.actor_gpus or None)
    # Ray Data's actor pools restart a dead actor and run its batches again (max_restarts=-1, max_task_retries=-1
    # by default; passing them is deprecated in 2.60): a killed worker costs its batch, not the job.
    seen: set[str] = set()
    t0 = time.perf_counter()
    bar = tqdm(total=len(inputs), desc="scan", unit="img", file=sys.stderr, disable=not progress)
    try:
        # prefetch_batches=0: a batch reaches the table as soon as its actor is done (prefetching holds it back until
        # the next one is ready, so a kill would lose both)
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        for sequence, batch in enumerate(batches):
            skip = batch.column("skip")
            fresh = batch.filter(pc.invert(skip))
            if fresh.num_rows:
                write_part(out, fresh, settings["run_id"], sequence)
            fine = fresh.column("error").null_count
            summary.localized += fine
            summary.failed += fresh.num_rows - fine
            summary.skipped += batch.num_rows - fresh.num_rows
            seen.update(batch.column("path").to_pylist())
            bar.update(batch.num_rows)
            bar.set_postfix(failed=summary.failed, skipped=summary.skipped, refresh=False)
            if on_batch is not None:
                on_batch(batch.num_rows)
    except ray.exceptions.RayError as exc:
        raise DiffimlError(f"the Ray job stopped after {len(seen)} of {len(inputs)} inputs: {_cause(exc)} (the rows "
                           "so far are kept; a rerun into the same --out does the rest)") from None
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
    summary.missing = [p for p in inputs if p not in seen]
    return summary


def _cause(exc: BaseException) -> str:
    """The root error of a Ray failure: the last line of the remote traceback Ray carries, without colors."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z]\w*(?:Error|Exception): )", "", last)[:300]


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
    from diffiml.runtime.commands import _output_folder
    from diffiml.runtime.scan_inputs import list_inputs

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
    out = _output_folder(args.out)
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
        summary = run_scan(inputs, out, settings, layout, progress=not args.no_progress)
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
        from diffiml.runtime.report import write_report

        print(f"diffiml scan: report {write_report(out)}", file=sys.stderr)
    if summary.missing:
        print(f"diffiml scan: {len(summary.missing)} inputs have no row (first: {summary.missing[0]}); run the same "
              "command again", file=sys.stderr)
        return 1
    return 0

