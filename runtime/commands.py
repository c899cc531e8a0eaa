"""``diffiml localize``: files, folders and globs in; mask / probability / overlay PNGs and one JSON line per image
out. A bad input is one line on stderr naming it; the other images still complete; the exit status is 1 if any
input failed, 2 if nothing could run (bad bundle, bad arguments)."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

from diffiml.runtime.errors import DiffimlError

log = logging.getLogger(__name__)
DEFAULT_BUNDLE = "engines/default"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".jp2", ".pgm", ".ppm"}


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
    s.add_argument("--backend", default="auto", choices=["auto", "ort-cpu", "ort-cuda", "tensorrt"])
    s.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
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
    add_copy_move_option(s, "it costs 0.2-1 s of CPU per image, one image after another")
    add_follow_decision_option(s)
    s.set_defaults(handler=serve)

    from diffiml.runtime.scan import add_parser as add_scan_parser  # Ray itself is imported only when scan runs

    add_scan_parser(sub)


def add_localizer_options(parser: argparse.ArgumentParser) -> None:
    """The options of how a bundle runs, the same for every command that localizes here (localize, scan)."""
    parser.add_argument("--backend", default="auto", choices=["auto", "ort-cpu", "ort-cuda", "tensorrt"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"],
                        help="which of the bundle's graphs to run (int8: CPU; fp16: CUDA)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ensemble", default=None, metavar="N|auto[:N]",
                        help="ensemble members, or auto: stop adding members once the mask settles (at most N)")
    add_fast_option(parser)
    parser.add_argument("--ensemble-tolerance", type=float, default=None, metavar="FRACTION",
                        help="auto ensemble: stop when at most this fraction of pixels flipped (default 0.002)")
    parser.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    parser.add_argument("--uncertainty", action="store_true", help="also write the ensemble's per-pixel spread")
    parser.add_argument("--seed", type=int, default=0)
    add_copy_move_option(parser)
    add_follow_decision_option(parser)


FAST_ENSEMBLE = 3  # members of the fast mode (benchmarks/RESULTS.md, "Distillation")


def add_fast_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true",
                        help=f"the bundle's distilled student at its step count, {FAST_ENSEMBLE} members (unless "
                             "--ensemble says otherwise); refused for a bundle without a student")


def apply_fast(args: argparse.Namespace) -> None:
    """``--fast`` -> ``args.steps`` and ``args.ensemble`` of the bundle's fast mode; a one-line error when the bundle
    has no distilled student, or when ``--steps`` asks for another count."""
    if not getattr(args, "fast", False):
        return
    from diffiml.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle, verify=False)  # the manifest only; the localizer verifies the graphs
    if bundle.fast_steps is None:
        raise DiffimlError(f"{args.bundle}: --fast needs a distilled UNet in the bundle (diffiml distill, then "
                           "export --student); this bundle has none")
    if args.steps not in (None, bundle.fast_steps):
        raise DiffimlError(f"--fast runs the student's {bundle.fast_steps} steps; drop --steps {args.steps}")
    args.steps = bundle.fast_steps
    args.ensemble = args.ensemble if args.ensemble is not None else FAST_ENSEMBLE


def add_follow_decision_option(parser: argparse.ArgumentParser) -> None:
    """``--follow-decision`` (into ``args.follow_decision``), the same for every command that writes masks."""
    parser.add_argument("--follow-decision", action="store_true",
                        help="empty the mask and overlay of images the bundle's detector judges authentic (the "
                             "probability map is written either way); off by default: on real forgeries it costs "
                             "localization F1 (benchmarks/RESULTS.md)")


def add_copy_move_option(parser: argparse.ArgumentParser, why: str = "the score-based model's map alone") -> None:
    """``--no-copy-move`` (into ``args.copy_move``), the same for every command that opens a bundle."""
    parser.add_argument("--no-copy-move", dest="copy_move", action="store_false",
                        help=f"leave out the bundle's classical copy-move cue ({why})")


def serve(args: argparse.Namespace) -> int:
    from diffiml.runtime.serving import ServeOptions
    from diffiml.runtime.serving import serve as run_server

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
    from diffiml.runtime.report import write_report

    print(write_report(Path(args.dir), title=args.title))
    return 0


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files as given (even if not images: they fail later with a clear line), folders' images, glob matches."""
    paths: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif any(c in pattern for c in "*?["):
            paths += sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())
        else:
            paths.append(p)
    return paths


def adaptive_policy(args: argparse.Namespace):  # -> AdaptiveEnsemble | None (imported lazily)
    """``--ensemble-tolerance`` as an AdaptiveEnsemble; None leaves the default policy to ``--ensemble auto``."""
    if getattr(args, "ensemble_tolerance", None) is None:
        return None
    from diffiml.runtime.localizer import AdaptiveEnsemble

    if not 0 <= args.ensemble_tolerance <= 1:
        raise DiffimlError("--ensemble-tolerance must be in [0, 1]")
    if not str(args.ensemble or "").lower().startswith("auto"):
        raise DiffimlError("--ensemble-tolerance applies to an adaptive ensemble: add --ensemble auto (or auto:N)")
    return AdaptiveEnsemble(tolerance=args.ensemble_tolerance)


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


def _output_folder(name: str) -> Path:
    """An unusable --out is one line before any work, not one failure per image."""
    out = Path(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffimlError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise DiffimlError(f"{out}: the output folder is not writable")
    return out


def localize(args: argparse.Namespace) -> int:
    from diffiml.runtime.image_io import load_image

    paths = expand_inputs(args.inputs)
    if not paths:
        raise DiffimlError("no input images matched")
    apply_fast(args)
    if args.server is not None:
        if args.reference is not None or args.tta or not args.copy_move or args.follow_decision:
            raise DiffimlError("--server runs the server's bundle: --reference, --tta, --no-copy-move and "
                               "--follow-decision are local only (serve --follow-decision sets it for the server)")
        return _localize_on_server(args, paths)
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
    out = _output_folder(args.out)

    def one(path: Path):  # noqa: ANN202 - (result, overlay image, backend label, bundle id)
        decoded = load_image(path, localizer.bundle.image_size)
        return localizer.localize(decoded), decoded.rgb, localizer.backend, localizer.bundle.bundle_id

    with localizer:
        settings = {"bundle": args.bundle, "bundle_id": localizer.bundle.bundle_id, "backend": localizer.backend,
                    "precision": args.precision,
                    "ensemble": f"auto:{localizer.ensemble}" if localizer.adaptive else localizer.ensemble,
                    "steps": localizer.steps, "seed": localizer.seed, "tta": localizer.tta,
                    "uncertainty": localizer.uncertainty, "copy_move_cue": localizer.copy_move is not None,
                    "detector": localizer.detector is not None, "follow_decision": localizer.follow_decision}
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
        from diffiml.runtime.report import write_localize_run

        print(f"diffiml localize: report: {write_localize_run(out, report, records)}", file=sys.stderr)
    if failures:
        print(f"diffiml localize: {failures} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failures else 0


def _localize_on_server(args: argparse.Namespace, paths: list[Path]) -> int:
    """``localize --server``: the same files and JSON lines as a local run, computed by a ``diffiml serve``."""
    from diffiml.runtime.image_io import load_image, read_image_file
    from diffiml.runtime.triton_client import TritonLocalizer

    if args.ensemble is not None and not str(args.ensemble).isdigit():
        raise DiffimlError("--server takes a fixed --ensemble N (the adaptive ensemble runs locally)")
    ensemble = None if args.ensemble is None else int(args.ensemble)
    client = TritonLocalizer(args.server, steps=args.steps, ensemble=ensemble, seed=args.seed,
                             uncertainty=args.uncertainty)
    if not client.is_ready():
        raise DiffimlError(f"{args.server}: no ready diffiml model there (is `diffiml serve` running?)")
    out = _output_folder(args.out)

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
