"""Command-line handlers of the export stage: ``diffiml export`` and ``diffiml build-engines``."""

from __future__ import annotations

import argparse
import json

import numpy as np


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> engine bundle (three ONNX graphs + manifest.json)")
    p.add_argument("checkpoint", help="a run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="bundle folder, e.g. engines/NAME")
    p.add_argument("--name", default=None)
    p.add_argument("--no-copy-move-cue", dest="copy_move_cue", action="store_false",
                   help="leave the classical copy-move cue out of the bundle (the model's map alone)")
    p.add_argument("--precision", default="fp32", metavar="fp32|int8|fp16[,...]",
                   help="fp32 graphs always; int8 adds graphs for CPU (needs --calibration), fp16 graphs for CUDA")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="training-style images (a JSON list or Tp/Gt folder; never an evaluation set): int8 calibrates "
                        "on them, and every reduced precision is checked against fp32 on 8 others")
    p.add_argument("--calibration-images", type=int, default=32, help="int8: images to calibrate on (+8 to check)")
    p.add_argument("--attention", default="fused", choices=["fused", "standard"],
                   help="fused: the UNet's attention as onnxruntime's MultiHeadAttention (fast, low memory); "
                        "standard: plain ONNX ops, for TensorRT (build-engines)")
    p.set_defaults(handler=export)

    p = sub.add_parser("build-engines", help="build TensorRT engines for a bundle (needs TensorRT and a GPU)")
    p.add_argument("bundle")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="build from the bundle's graphs of this precision (strongly typed)")
    p.add_argument("--max-batch", type=int, default=1, help="images per batch the engines must accept")
    p.add_argument("--ensemble", type=int, default=None, help="largest ensemble size (default: the bundle's)")
    p.set_defaults(handler=build_engines)

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
                             copy_move_cue=args.copy_move_cue)
    print(json.dumps({"bundle": args.out, "graphs": {k: v["sha256"] for k, v in manifest["graphs"].items()},
                      "checks": manifest["checks"],
                      **{f"{p}_checks": e["checks"] for p, e in manifest.get("precisions", {}).items()}}))
    return 0


def build_engines(args: argparse.Namespace) -> int:
    from diffiml.export.tensorrt_build import build_bundle_engines

    entries = build_bundle_engines(args.bundle, args.precision, args.max_batch, args.ensemble)
    print(json.dumps({"bundle": args.bundle, "engines": entries}))
    return 0
