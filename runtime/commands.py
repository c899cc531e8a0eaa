"""``diffiml localize``: files, folders and globs in; mask / probability / overlay PNGs and one JSON line per image
out. A bad input is one line on stderr naming it; the other images still complete; the exit status is 1 if any
input failed, 2 if nothing could run (bad bundle, bad arguments)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from diffiml.runtime.errors import DiffimlError
from diffiml.runtime.options import (
    DEFAULT_BUNDLE,
    adaptive_policy,
    add_localizer_options,
    apply_fast,
    expand_inputs,
    output_folder,
)

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("localize", help="localize manipulated pixels in images")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"engine bundle folder (default {DEFAULT_BUNDLE})")
    p.add_argument("--out", required=True, help="output folder")
    add_localizer_options(p)
    p.add_argument("--reference", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="run the PyTorch reference sampler (imports torch) on CHECKPOINT, or on the bundle's own")
    p.add_argument("--truth", default=None, help="a true mask for a single input: prints the F1 against it")
    p.add_argument("--server", default=None, metavar="URL",
                   help="send the images to a `diffiml serve` endpoint (http://HOST:PORT or grpc://HOST:PORT) "
                        "instead of running the bundle here")
    p.add_argument("--report", action="store_true",
                   help="also write report.html in --out: the images ranked by score, settings and failures")
    p.set_defaults(handler=localize)

    r = sub.add_parser("report", help="write report.html for a scan or localize --report output folder")
    r.add_argument("dir", metavar="DIR", help="the --out folder of `diffiml scan` or `diffiml localize --report`")
    r.add_argument("--title", default=None, help="the page's title (default: the folder's name)")
    r.set_defaults(handler=report)

    s = sub.add_parser("serve", help="serve a bundle with NVIDIA Triton Inference Server (PyTriton)")
    s.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"engine bundle folder (default {DEFAULT_BUNDLE})")
    add_localizer_options(s, served=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000,
                   help="HTTP port; gRPC is PORT+1, Triton's metrics PORT+2, diffiml's row/failure counts PORT+3")
    s.add_argument("--max-batch", type=int, default=8, help="largest batch of requests (1: no dynamic batching)")
    s.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                   help="how long Triton may hold a request to batch it with others")
    s.add_argument("--instances", type=int, default=1, help="model instances, each with its own engines")
    s.add_argument("--threads", type=int, default=None, help="intra-op threads per instance (default: cores/instances)")
    s.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait in Triton's queue before it is rejected")
    s.add_argument("--max-queue", type=int, default=256, help="queued requests beyond this are rejected at once")
    s.set_defaults(handler=serve)

    from diffiml.runtime.scan.driver import add_parser as add_scan_parser  # Ray is imported only when scan runs

    add_scan_parser(sub)


def serve(args: argparse.Namespace) -> int:
    from diffiml.runtime.serving.server import ServeOptions
    from diffiml.runtime.serving.server import serve as run_server

    if args.max_batch < 1 or args.instances < 1 or not 0 < args.port < 65533:
        raise DiffimlError("--max-batch and --instances must be >= 1, --port in 1..65532")
    if args.queue_timeout <= 0 or args.max_queue < 1:
        raise DiffimlError("--queue-timeout must be > 0 and --max-queue >= 1")
    run_server(ServeOptions(bundle=Path(args.bundle), backend=args.backend, host=args.host, http_port=args.port,
                            grpc_port=args.port + 1, metrics_port=args.port + 2, max_batch=args.max_batch,
                            max_queue_delay_ms=args.max_queue_delay_ms, instances=args.instances,
                            threads=args.threads, precision=args.precision, queue_timeout_s=args.queue_timeout,
                            max_queue=args.max_queue, stats_port=args.port + 3, copy_move=args.copy_move,
                            follow_decision=args.follow_decision))
    return 0


def report(args: argparse.Namespace) -> int:
    from diffiml.runtime.report.writer import write_report

    print(write_report(Path(args.dir), title=args.title))
    return 0


def _print_record(path: Path, result, backend: str, t0: float, files: dict[str, str],  # noqa: ANN001
                  truth: str | None, bundle_id: str | None = None) -> dict:
    """One JSON line per localized image (the same for a local run and a server's answer); returns the record."""
    from diffiml.runtime.image_io import load_image
    from diffiml.runtime.metrics import pixel_f1

    record = {"path": str(path), "score": round(result.score, 4), "decision": result.decision,
              "manipulated_fraction": round(result.manipulated_fraction, 4), "backend": backend,
              "members": result.members, "bundle_id": bundle_id,
              **({} if result.copy_move_fraction is None
                 else {"copy_move_fraction": round(result.copy_move_fraction, 4)}),
              "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
              "total_ms": round((time.perf_counter() - t0) * 1000, 2), "outputs": files}
    if truth:
        record["f1"] = round(pixel_f1(result.mask, load_image(truth).rgb[..., 0] >= 128), 4)
    print(json.dumps(record), flush=True)
    return record


def localize(args: argparse.Namespace) -> int:
    from diffiml.runtime.image_io import load_image

    paths = expand_inputs(args.inputs)
    if not paths:
        raise DiffimlError("no input images matched")
    if args.server is not None:
        if args.reference is not None or args.tta or not args.copy_move or args.follow_decision or args.fast:
            raise DiffimlError("--server runs the server's bundle: --reference, --tta, --no-copy-move, --fast and "
                               "--follow-decision are local only (serve --follow-decision sets it for the server; "
                               "--steps and --ensemble choose the server's mode)")
        return _localize_on_server(args, paths)
    apply_fast(args)
    if args.reference is not None:
        open_reference = getattr(args, "open_reference", None)  # plugged in by diffiml.export.commands
        if open_reference is None:
            raise DiffimlError("--reference needs the training stack (pip install 'diffiml[export]')")
        localizer = open_reference(args.bundle, args.reference or None, steps=args.steps, ensemble=args.ensemble,
                                   tta=args.tta, seed=args.seed, uncertainty=args.uncertainty,
                                   adaptive=adaptive_policy(args), copy_move=args.copy_move,
                                   follow_decision=args.follow_decision)
    else:
        from diffiml.runtime.localizer import Localizer

        localizer = Localizer.open(args.bundle, backend=args.backend, steps=args.steps, ensemble=args.ensemble,
                                   tta=args.tta, seed=args.seed, uncertainty=args.uncertainty,
                                   adaptive=adaptive_policy(args), precision=args.precision,
                                   copy_move=args.copy_move, follow_decision=args.follow_decision)
    out = output_folder(args.out)

    bundle_id = localizer.bundle.bundle_id  # a hash of the manifest: once, not per image

    def one(path: Path):  # noqa: ANN202 - (result, overlay image, backend label, bundle id)
        decoded = load_image(path, localizer.bundle.image_size)
        return localizer.localize(decoded), decoded.rgb, localizer.backend, bundle_id

    import cv2  # its version decides the copy-move cue's keypoints: recorded with the run

    with localizer:
        settings = {"bundle": args.bundle, "bundle_id": bundle_id, "backend": localizer.backend,
                    "precision": args.precision,
                    "ensemble": f"auto:{localizer.ensemble}" if localizer.adaptive else localizer.ensemble,
                    "steps": localizer.steps, "seed": localizer.seed, "tta": localizer.tta,
                    "uncertainty": localizer.uncertainty, "copy_move_cue": localizer.copy_move is not None,
                    "detector": localizer.detector is not None, "follow_decision": localizer.follow_decision,
                    "opencv": cv2.__version__}
        return _localize_each(paths, one, out, args.truth, settings if args.report else None)


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """Each input's output stem: its own, or, where two inputs share one (``a/x.png``, ``b/x.png``), the stem and the
    first 10 hex digits of the sha256 of its absolute path (as scan names its maps), so none overwrites another's."""
    import hashlib
    from collections import Counter

    count = Counter(p.stem for p in dict.fromkeys(paths))
    return {p: p.stem if count[p.stem] == 1 else
            f"{p.stem}_{hashlib.sha256(os.path.abspath(p).encode()).hexdigest()[:10]}" for p in paths}


def _localize_each(paths: list[Path], one, out: Path, truth: str | None,  # noqa: ANN001
                   report: dict | None = None) -> int:
    """The loop of ``localize``, local or on a server: ``one(path)`` gives (result, image for the overlay, backend
    label). Each image's files and JSON line, or one line naming it when it fails; the others go on. With
    ``report`` (the run's settings), the records also go to ``localize.json`` and ``report.html`` in ``out``."""
    from tqdm import tqdm

    from diffiml.runtime.outputs import write_outputs

    failures = 0
    records: list[dict] = []
    stems = output_stems(paths)
    for path in tqdm(paths, desc="localize", unit="img", file=sys.stderr, disable=len(paths) < 2):
        try:
            t0 = time.perf_counter()
            result, rgb, backend, bundle_id = one(path)
            files = write_outputs(result, rgb, out, stems[path])
        except (DiffimlError, ValueError, OSError) as exc:
            failures += 1
            text = str(exc).replace("<bytes>", str(path))
            message = text if str(path) in text else f"{path}: {text}"
            tqdm.write(f"diffiml localize: {message}", file=sys.stderr)  # on its own line, not after the bar
            records.append({"path": str(path), "error": message})
            continue
        record = _print_record(path, result, backend, t0, files, truth if len(paths) == 1 else None, bundle_id)
        records.append({**record, "width": result.width, "height": result.height})
    if report is not None:
        from diffiml.runtime.report.writer import write_localize_run

        print(f"diffiml localize: report: {write_localize_run(out, report, records)}", file=sys.stderr)
    if failures:
        print(f"diffiml localize: {failures} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failures else 0


def _localize_on_server(args: argparse.Namespace, paths: list[Path]) -> int:
    """``localize --server``: the same files and JSON lines as a local run, computed by a ``diffiml serve``."""
    from diffiml.runtime.image_io import load_image, read_image_file
    from diffiml.runtime.serving.client import TritonLocalizer

    if args.ensemble is not None and not str(args.ensemble).isdigit():
        raise DiffimlError("--server takes a fixed --ensemble N (the adaptive ensemble runs locally)")
    ensemble = None if args.ensemble is None else int(args.ensemble)
    client = TritonLocalizer(args.server, steps=args.steps, ensemble=ensemble, seed=args.seed,
                             uncertainty=args.uncertainty)
    if not client.is_ready():
        raise DiffimlError(f"{args.server}: no ready diffiml model there (is `diffiml serve` running?)")
    out = output_folder(args.out)

    def one(path: Path):  # noqa: ANN202 - (result, overlay image, backend label, bundle id)
        answer = client.localize_bytes(read_image_file(path))
        decoded = load_image(path, answer.result.model_probability.shape[0])  # for the overlay only
        return (answer.result, decoded.rgb, f"{answer.info.get('backend', '?')}@{args.server}",
                answer.info.get("bundle_id"))

    default = "the server's default"
    settings = {"bundle": f"served by {args.server}", "ensemble": default if ensemble is None else ensemble,
                "steps": default if args.steps is None else args.steps, "seed": args.seed,
                "uncertainty": args.uncertainty}
    try:
        return _localize_each(paths, one, out, args.truth, settings if args.report else None)
    finally:
        client.close()
