"""Command-line handlers of the export stage: ``diffiml export`` and ``diffiml build-engines``."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> engine bundle (three ONNX graphs + manifest.json)")
    p.add_argument("checkpoint", help="a run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="bundle folder, e.g. engines/NAME")
    p.add_argument("--name", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp32 graphs (fp16 ONNX variants are not available yet)")
    p.add_argument("--attention", default="fused", choices=["fused", "standard"],
                   help="fused: the UNet's attention as onnxruntime's MultiHeadAttention (fast, low memory); "
                        "standard: plain ONNX ops, for TensorRT (build-engines)")
    p.set_defaults(handler=export)

    p = sub.add_parser("build-engines", help="build TensorRT engines for a bundle (needs TensorRT and a GPU)")
    p.add_argument("bundle")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
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

    if args.precision == "fp16":
        # Not built yet: its check (binary masks agree with fp32 on >= 99 % of pixels) needs an fp16-capable
        # onnxruntime provider, and the CPU provider computes in fp32 only. TensorRT builds fp16 engines from
        # the fp32 graphs instead (diffiml build-engines --precision fp16).
        raise ValueError("--precision fp16: the fp16 ONNX variant is not available yet; export fp32 and build "
                         "fp16 TensorRT engines with `diffiml build-engines --precision fp16`")
    manifest = export_bundle(args.checkpoint, args.out, args.name, attention=args.attention)
    print(json.dumps({"bundle": args.out, "graphs": {k: v["sha256"] for k, v in manifest["graphs"].items()},
                      "checks": manifest["checks"]}))
    return 0


def build_engines(args: argparse.Namespace) -> int:
    from diffiml.export.tensorrt_build import build_bundle_engines

    entries = build_bundle_engines(args.bundle, args.precision, args.max_batch, args.ensemble)
    print(json.dumps({"bundle": args.bundle, "engines": entries}))
    return 0
