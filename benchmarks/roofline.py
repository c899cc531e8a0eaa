"""``diffiml bench roofline``: how close each graph of a bundle runs to this machine's fp32 peak, and where the time
goes.

The yardstick is measured the way onnxruntime sees the machine: one large MatMul and one large 3x3 Conv, each in its
own onnxruntime session with the runtime's thread count; the faster of the two (multiply-accumulates per second),
best of 20 runs, before and after the graphs, is "peak". Each graph runs at the batch the runtime gives it (one
image; N members for the UNet step), timed without profiling, best of ``runs``; a second, profiled session splits
the time by operator class, and a third (no graph optimizations, no weight prepacking) reports every node's shapes
as exported, from which the multiply-accumulates are counted (Conv, ConvTranspose, MatMul, Gemm, fused attention).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.runtime.backends.ort_backend import ort_module, session_options
from diffiml.runtime.bundle import GRAPH_NAMES, load_bundle

CLASSES = {
    "conv": ("Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger", "NhwcConv", "ConvTranspose"),
    "matmul": ("MatMul", "FusedMatMul", "Gemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QGemm"),
    "attention": ("MultiHeadAttention", "Attention", "Softmax"),
    "norm": ("GroupNorm", "GroupNormalization", "LayerNormalization", "SkipLayerNormalization",
             "InstanceNormalization", "SimplifiedLayerNormalization", "BatchNormalization", "ReduceMean"),
    "copy/layout": ("Transpose", "Reshape", "Concat", "Slice", "ReorderInput", "ReorderOutput", "Expand", "Gather",
                    "Split", "Resize", "Pad", "Squeeze", "Unsqueeze", "Identity", "Tile", "Cast", "DepthToSpace",
                    "QuantizeLinear", "DequantizeLinear"),
}


def op_class(op: str) -> str:
    return next((name for name, ops in CLASSES.items() if op in ops), "elementwise")


def node_macs(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """Multiply-accumulates of one node from its input/output shapes (0 for ops that do not count)."""
    if not outputs or not outputs[0]:
        return 0
    out = math.prod(outputs[0])
    if op == "ConvTranspose" and len(inputs) > 1 and len(inputs[1]) == 4:  # weight (Cin, Cout/groups, kh, kw)
        return math.prod(inputs[0]) * math.prod(inputs[1][1:])
    weight_index = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "NhwcConv": 1, "ConvInteger": 1,
                    "QLinearConv": 3}.get(op)
    if weight_index is not None and len(inputs) > weight_index and len(inputs[weight_index]) == 4:
        _, cin_per_group, kh, kw = inputs[weight_index]
        return out * cin_per_group * kh * kw
    if op in CLASSES["matmul"] and inputs and inputs[0]:
        # A constant B is prepacked and missing from the profile's shapes; A's last dimension is K either way.
        return out * inputs[0][-1]
    if op in ("MultiHeadAttention", "Attention") and len(inputs) >= 2 and len(inputs[0]) == 3:
        b, s, hidden = inputs[0]
        kv = inputs[1][1] if len(inputs[1]) == 3 else s
        return 2 * b * s * kv * hidden  # Q·Kᵀ and P·V
    return 0


def _time(session: Any, feeds: dict[str, np.ndarray], runs: int, warmup: int) -> float:
    """The best of ``runs``: on a shared 2-core machine other load only ever slows a run down, and the peak and
    the graphs are compared on the same footing (best against best)."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_peak(threads: int | None, runs: int = 20) -> dict[str, float]:
    """GMAC/s of a 1024³ MatMul and a 3x3 Conv (1x128x128x128 -> 128) through onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    ort = ort_module()
    rng = np.random.default_rng(0)
    results = {}
    n = 1024
    w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])
    c, hw = 128, 128
    k = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.05, "k")
    conv = helper.make_graph([helper.make_node("Conv", ["x", "k"], ["y"], pads=[1, 1, 1, 1])], "conv",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], [k])
    cases = {"matmul_1024": (graph, {"x": rng.standard_normal((n, n), dtype=np.float32)}, n ** 3),
             "conv3x3_128c_128px": (conv, {"x": rng.standard_normal((1, c, hw, hw), dtype=np.float32)},
                                    c * hw * hw * c * 9)}
    for name, (g, feeds, macs) in cases.items():
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                       providers=["CPUExecutionProvider"])
        results[name] = macs / _time(session, feeds, runs, 3) / 1e9
    results["peak"] = max(results.values())
    return results


def _graph_feeds(bundle: Any, name: str, members: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = {"images": 1, "members": members, "latents": 1}
    feeds = {}
    for t in bundle.graph(name).inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t["shape"]]
        feeds[t["name"]] = rng.standard_normal(shape).astype(np.float32)
    if name == "unet":
        feeds["timestep"] = np.array([500.0], np.float32)
        for k in ("coef_x0", "coef_xt", "sqrt_alpha"):
            feeds[k] = np.array([0.5], np.float32)
    return feeds


def _profile_events(path: Path, feeds: dict[str, np.ndarray], opts: Any, runs: int) -> list[dict[str, Any]]:
    ort = ort_module()
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feeds)
        return [e for e in json.loads(Path(session.end_profiling()).read_text())
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def graph_macs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates of one run of the graph as written, per operator class. Shapes come from a profiled run
    with graph optimizations and weight prepacking off: every node as exported, every input's shape reported (the
    optimized session prepacks constant weights out of the report and pads channels in its blocked NCHWc convs)."""
    ort = ort_module()
    opts = session_options(1)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.disable_prepacking", "1")
    by_class: dict[str, int] = {}
    for e in _profile_events(path, feeds, opts, 1):
        args = e["args"]
        shapes = [list(next(iter(d.values()))) for d in args.get("input_type_shape", [])]
        outs = [list(next(iter(d.values()))) for d in args.get("output_type_shape", [])]
        macs = node_macs(args["op_name"], shapes, outs)
        if macs:
            cls = op_class(args["op_name"])
            by_class[cls] = by_class.get(cls, 0) + macs
    return by_class


def profile_graph(path: Path, feeds: dict[str, np.ndarray], threads: int | None, runs: int
                  ) -> tuple[float, dict[str, float]]:
    """(median seconds per run, kernel seconds per operator class per run)."""
    ort = ort_module()
    plain = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    seconds = _time(plain, feeds, runs, 2)
    del plain
    by_node: dict[str, list[dict[str, Any]]] = {}
    for e in _profile_events(path, feeds, session_options(threads), runs + 1):
        by_node.setdefault(e["name"], []).append(e)
    per_class: dict[str, float] = {}
    for node_events in by_node.values():
        timed = node_events[1:] or node_events  # drop the warm-up run
        cls = op_class(node_events[0]["args"]["op_name"])
        per_class[cls] = per_class.get(cls, 0.0) + sum(e["dur"] for e in timed) / 1e6 / len(timed)
    return seconds, per_class


def roofline(bundle_dir: str | Path, members: int | None = None, threads: int | None = None, runs: int = 5,
             precision: str = "fp32") -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    n = members or bundle.default_ensemble
    before = measure_peak(threads)
    peak = dict(before)
    graphs = {}
    batch = {"condition_encoder": "1 image", "unet": f"1 image × {n} members", "mask_decoder": "1 latent"}
    for name in GRAPH_NAMES:
        feeds = _graph_feeds(bundle, name, n)
        seconds, per_class = profile_graph(bundle.graph(name, precision).path, feeds, threads, runs)
        # Counted on the fp32 graph at every precision (the same arithmetic): int8 GMAC/s is fp32-equivalent.
        macs_by_class = graph_macs(bundle.graph(name).path, feeds)
        gmacs = sum(macs_by_class.values()) / 1e9
        kernel_total = sum(per_class.values()) or 1.0
        # Each class's share of the wall time, from its share of the kernel time; its GMAC/s against the peak.
        class_pct = {cls: round(100 * macs / 1e9 / (seconds * per_class[cls] / kernel_total) / peak["peak"], 1)
                     for cls, macs in macs_by_class.items() if per_class.get(cls)}
        graphs[name] = {
            "batch": batch[name], "ms": round(seconds * 1000, 2), "gmacs": round(gmacs, 6),
            "gmac_per_s": round(gmacs / seconds, 2), "pct_of_peak": round(100 * gmacs / seconds / peak["peak"], 1),
            "time_share_pct": {k: round(100 * v / kernel_total, 1) for k, v in sorted(per_class.items(),
                                                                                     key=lambda kv: -kv[1])},
            "pct_of_peak_by_class": class_pct, "_peak0": peak["peak"],
        }
    after = measure_peak(threads)  # the machine's speed drifts: the peak is the best seen before or after
    for key in before:
        peak[key] = max(before[key], after[key])
    for g in graphs.values():
        g["pct_of_peak"] = round(100 * g["gmac_per_s"] / peak["peak"], 1)
        g["pct_of_peak_by_class"] = {k: round(v * g["_peak0"] / peak["peak"], 1)
                                     for k, v in g["pct_of_peak_by_class"].items()}
        del g["_peak0"]
    return {"bundle": str(bundle_dir), "precision": precision, "macs_counted_on": "fp32 graph",
            "threads": threads or os.cpu_count(), "peak_gmac_per_s": {k: round(v, 2) for k, v in peak.items()},
            "graphs": graphs}


def markdown(result: dict[str, Any]) -> str:
    peak = result["peak_gmac_per_s"]["peak"]
    lines = [f"peak (onnxruntime, {result['threads']} threads): {peak} GMAC/s "
             f"({', '.join(f'{k} {v}' for k, v in result['peak_gmac_per_s'].items() if k != 'peak')})", "",
             "| graph | batch | ms | GMACs | GMAC/s | % of peak | % of peak by operator class | "
             "where the time goes (% of kernel time) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, g in result["graphs"].items():
        share = ", ".join(f"{k} {v}" for k, v in g["time_share_pct"].items() if v >= 1)
        by_class = ", ".join(f"{k} {v}" for k, v in g["pct_of_peak_by_class"].items())
        lines.append(f"| {name} | {g['batch']} | {g['ms']} | {round(g['gmacs'], 3)} | {g['gmac_per_s']} | "
                     f"{g['pct_of_peak']} | {by_class} | {share} |")
    return "\n".join(lines) + "\n"
