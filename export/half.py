"""An fp16 precision for CUDA bundles: every graph converted with onnxruntime's own float16 converter, keeping
fp32 where fp16 loses what the model needs: the DDIM update at the end of the UNet-step graph (it carries the
latents from step to step), normalization statistics, softmax and the decoder's sigmoid. Inputs and outputs stay
fp32, so the runtime feeds and reads the same tensors at every precision.

The export checks the fp16 graphs against fp32 with onnxruntime's CPU provider (mask agreement, max |Δp|); the
numbers that matter for deployment are those of the CUDA provider, which ``benchmarks/gpu/run.sh`` measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffiml.export.precision_check import graph_entry, record_check
from diffiml.runtime.bundle import load_bundle

FP32_OPS = ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization", "ReduceMean",
            "Softmax", "Sigmoid", "Pow", "Sqrt", "Erf"]


def fp32_nodes(model: Any, graph: str) -> list[str]:
    """Nodes that stay fp32 by name: the UNet-step graph's DDIM update (every node outside the ``/unet/`` module)."""
    if graph != "unet":
        return []
    return [n.name for n in model.graph.node if not n.name.startswith("/unet/") and n.op_type != "Constant"]


def convert_graph(fp32_path: Path, out_path: Path, graph: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS,
                                    node_block_list=fp32_nodes(model, graph))
    onnx.save(half, str(out_path))


def add_fp16(bundle_dir: Path, check: Sequence[Any] = ()) -> dict[str, Any]:
    """Write ``GRAPH.fp16.onnx`` for every graph, compare with fp32 on ``check`` images (CPU), and return the
    manifest's ``precisions.fp16`` entry."""
    bundle = load_bundle(bundle_dir)
    graphs: dict[str, Any] = {}
    for name in bundle.graph_names:  # distilled UNets (unet_kK) too: they are UNet-step graphs
        fp32 = bundle.graph(name)
        out = Path(bundle_dir) / f"{name}.fp16.onnx"
        convert_graph(fp32.path, out, "unet" if name in bundle.unet_graphs else name)
        graphs[name] = graph_entry(out, "fp16", fp32.inputs, fp32.outputs)
    entry: dict[str, Any] = {"graphs": graphs, "fp32_ops": FP32_OPS,
                             "fp32_nodes": "the UNet-step graph's DDIM update"}
    if check:
        record_check(bundle, "fp16", entry, check, bundle.default_steps, bundle.default_ensemble)
    else:
        entry["checks"] = {}
    return entry
