"""Command-line handlers of the export stage: ``diffiml export`` and ``diffiml build-engines``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> engine bundle (three ONNX graphs + manifest.json)")
    p.add_argument("checkpoint", help="a run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="bundle folder, e.g. engines/NAME")
    p.add_argument("--name", default=None)
    p.add_argument("--no-copy-move-cue", dest="copy_move_cue", action="store_false",
                   help="leave the classical copy-move cue out of the bundle (the model's map alone)")
    p.add_argument("--no-detector", dest="detector", action="store_false",
                   help="leave out the checkpoint's fitted image-level detector (detector.json): the score is then "
                        "the map's top pixels and the mask is never emptied")
    p.add_argument("--precision", default="fp32", metavar="fp32|int8|fp16[,...]",
                   help="fp32 graphs always; int8 adds graphs for CPU (needs --calibration), fp16 graphs for CUDA")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="training-style images (a JSON list or Tp/Gt folder; never an evaluation set): int8 calibrates "
                        "on them, and every reduced precision is checked against fp32 on 8 others")
    p.add_argument("--calibration-images", type=int, default=32, help="int8: images to calibrate on (+8 to check)")
    p.add_argument("--attention", default="fused", choices=["fused", "standard"],
                   help="fused: the UNet's attention as onnxruntime's MultiHeadAttention (fast, low memory); "
                        "standard: plain ONNX ops, for TensorRT (build-engines)")
    p.add_argument("--student", action="append", default=[], metavar="CHECKPOINT",
                   help="a UNet distilled from this checkpoint (`diffiml distill`, OUT/steps-K): the bundle runs it "
                        "for --steps K (repeatable, one per K)")
    p.set_defaults(handler=export)

    p = sub.add_parser("build-engines", help="build TensorRT engines for a bundle (needs TensorRT and a GPU)")
    p.add_argument("bundle")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="build from the bundle's graphs of this precision (strongly typed)")
    p.add_argument("--max-batch", type=int, default=1, help="images per batch the engines must accept")
    p.add_argument("--ensemble", type=int, default=None, help="largest ensemble size (default: the bundle's)")
    p.set_defaults(handler=build_engines)

    f = sub.add_parser("fit-detector", help="fit the calibrated image-level detector on `diffiml eval --rows` output")
    f.add_argument("rows", nargs="+", metavar="ROWS", help="eval --rows files of training-photo forgeries and "
                                                           "authentic images (never an evaluation set)")
    f.add_argument("--bundle", default="engines/default", help="the bundle the rows were computed with")
    f.add_argument("--sources", default=None, help="make-synthetic's sources.json: split by source photo")
    f.add_argument("--out", required=True, help="detector.json, beside the checkpoint (export reads it there)")
    f.add_argument("--false-alarm-rate", type=float, default=0.05,
                   help="the decision threshold's target share of authentic images judged manipulated")
    f.add_argument("--calibration", nargs="*", default=[], metavar="ROWS",
                   help="eval --rows of images from photos the model never saw (make-synthetic's calibration.json): "
                        "Platt scaling and the threshold are set on them")
    f.add_argument("--calibration-fraction", type=float, default=0.25,
                   help="without --calibration: the share of the fitting rows' photos held out for calibration")
    f.add_argument("--feature-set", default=None, help="fit this candidate only (default: the best on calibration)")
    f.add_argument("--compare", nargs="*", default=[], metavar="ROWS",
                   help="eval --rows of other lists (same bundle): every candidate's image AUC there, "
                        "and the chosen detector's decision, false alarms and F1 (printed; never used to choose)")
    f.set_defaults(handler=fit_detector)

    if "localize" in sub.choices:  # `diffiml localize --reference` runs the checkpoint's PyTorch modules
        sub.choices["localize"].set_defaults(open_reference=open_reference)


def open_reference(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - the signature of reference.open_reference
    from diffiml.export.reference import open_reference as opener

    return opener(*args, **kwargs)


def export(args: argparse.Namespace) -> int:
    from diffiml.export.exporter import export_bundle

    wanted = set(args.precision.split(","))
    if not wanted <= {"fp32", "int8", "fp16"}:
        raise ValueError(f"--precision {args.precision}: choose from fp32, int8, fp16 (comma-separated)")
    calibration = check = None
    if "int8" in wanted or ("fp16" in wanted and args.calibration):
        from diffiml.train.data.readers import read_dataset

        if not args.calibration:
            raise ValueError("--precision int8 needs --calibration DATA (training-style images)")
        images = [s.image for s in read_dataset(args.calibration)]
        n = args.calibration_images
        if len(images) < n + 1:
            raise ValueError(f"--calibration {args.calibration}: {len(images)} images, need at least {n + 1}")
        # Spread over the list (not its first n); checked on 8 other images than those calibrated on.
        picked = [images[i] for i in np.unique(np.linspace(0, len(images) - 1, n + 8).astype(int))]
        calibration, check = (picked[:n] if "int8" in wanted else None), picked[n:]
    manifest = export_bundle(args.checkpoint, args.out, args.name, attention=args.attention,
                             int8_calibration=calibration, check_images=check, fp16="fp16" in wanted,
                             copy_move_cue=args.copy_move_cue, detector=args.detector, students=args.student)
    print(json.dumps({"bundle": args.out, "graphs": {k: v["sha256"] for k, v in manifest["graphs"].items()},
                      "checks": manifest["checks"],
                      **{f"{p}_checks": e["checks"] for p, e in manifest.get("precisions", {}).items()}}))
    return 0


def fit_detector(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.metrics import auc
    from diffiml.export.detector_fit import FitError, fit_detector, read_rows
    from diffiml.files import write_text_atomic
    from diffiml.runtime.bundle import load_bundle

    if not 0 < args.false_alarm_rate < 1 or not 0 < args.calibration_fraction < 1:
        raise FitError("--false-alarm-rate and --calibration-fraction must lie in (0, 1)")
    bundle = load_bundle(args.bundle, verify=False)
    sources = json.loads(open(args.sources).read()) if args.sources else {}
    detector, candidates = fit_detector(read_rows(args.rows), sources, bundle.manifest["checkpoint"]["sha256"],
                                        args.false_alarm_rate, args.calibration_fraction, args.feature_set,
                                        read_rows(args.calibration) if args.calibration else None)
    compare = {Path(p).stem: read_rows([p]) for p in args.compare}
    header = ["feature set", "features", "l2", "cross-validated log-loss", "cross-validated AUC",
              *(f"image AUC {name}" for name in compare)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in candidates:
        cells = [c.name + (" (chosen)" if c.names == detector.names else ""), str(len(c.names)), f"{c.l2:g}",
                 f"{c.cv_loss:.4f}", f"{c.cv_auc:.4f}",
                 *(f"{auc(c.logits(rows), np.array([r['manipulated'] for r in rows])):.4f}"
                   for rows in compare.values())]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if compare:  # the chosen detector on the other lists, as the bundle with it will run there
        from diffiml.export.detector_fit import applied

        results = {name: applied(detector, rows) for name, rows in compare.items()}
        keys = list(next(iter(results.values())))
        print("\n| rows | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
        for name, result in results.items():
            print(f"| {name} | " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                               for v in result.values()) + " |")
    write_text_atomic(Path(args.out), json.dumps(detector.manifest(), indent=1))
    print(json.dumps({"detector": args.out, **detector.record, "threshold": detector.threshold}))
    return 0


def build_engines(args: argparse.Namespace) -> int:
    from diffiml.export.tensorrt_build import build_bundle_engines

    entries = build_bundle_engines(args.bundle, args.precision, args.max_batch, args.ensemble)
    print(json.dumps({"bundle": args.bundle, "engines": entries}))
    return 0
