"""``diffiml build-engines``: one TensorRT engine per bundle graph, with the TensorRT 10 Python API.

ONNX parser; one optimization profile over the batch dimensions (images 1..max_batch, members up to
max_batch x ensemble, including flip TTA); one precision value (fp32, fp16, bf16); a persistent timing cache in
the bundle; each engine recorded in the manifest with the GPU's compute capability and the TensorRT version it is
bound to (and both in its file name). LayerNorm, Softmax and the decoder's tail are pinned to fp32 (DEPLOY.md).

Checked statically with mypy + tensorrt-stubs; TensorRT cannot be installed on this project's machines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import tensorrt as trt

from diffiml.files import write_bytes_atomic, write_text_atomic
from diffiml.runtime.backends.tensorrt_backend import device_identity, unavailable_reason
from diffiml.runtime.bundle import GRAPH_NAMES, load_bundle, sha256_of

log = logging.getLogger(__name__)
TIMING_CACHE = "timing.cache"


def fp32_layer_types() -> tuple[trt.LayerType, ...]:
    """Layers pinned to fp32 (a function: with tensorrt-stubs alone, ``tensorrt`` is an empty namespace package)."""
    return (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)


def batch_profile(graph: dict[str, Any], max_images: int, max_members: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input; 'images'/'latents' range over 1..max_images (x2 for TTA), 'members' over
    1..max_members (x2 for TTA). opt is the common case: one image, its full ensemble."""
    ranges = {"images": (1, 1, 2 * max_images), "latents": (1, 1, 2 * max_members),
              "members": (1, max_members // max_images, 2 * max_members)}
    profile = {}
    for spec in graph["inputs"]:
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in spec["shape"]]
        profile[spec["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return profile


def build_engine(onnx_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]], precision: str,
                 cache_path: Path) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in fp32_layer_types():
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine")
    write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_bundle_engines(bundle_dir: str | Path, precision: str, max_batch: int,
                         ensemble: int | None = None) -> list[dict[str, Any]]:
    bundle = load_bundle(bundle_dir)
    for name in GRAPH_NAMES:
        if foreign := bundle.graph(name).nonstandard_domains:
            raise ValueError(f"{bundle_dir}: the {name} graph uses onnxruntime-only operators ({', '.join(foreign)}), "
                             "which TensorRT's parser cannot read; export the bundle with "
                             "`diffiml export --attention standard` for TensorRT")
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"build-engines: {reason}")
    identity = device_identity()
    members = max_batch * (ensemble or bundle.default_ensemble)
    cc = identity["compute_capability"].replace(".", "")
    entries = []
    for name in GRAPH_NAMES:
        graph = bundle.graph(name)
        data = build_engine(graph.path, batch_profile(bundle.manifest["graphs"][name], max_batch, members),
                            precision, bundle.root / TIMING_CACHE)
        file = f"{name}.{precision}.sm{cc}.trt{identity['tensorrt_version']}.engine"
        write_bytes_atomic(bundle.root / file, data)
        entries.append({"graph": name, "file": file, "sha256": sha256_of(bundle.root / file), "precision": precision,
                        "max_images": max_batch, "max_members": members, **identity})
        log.info("%s: built %s", name, file)
    manifest = dict(bundle.manifest)
    keep = [e for e in manifest.get("engines", []) if (e["compute_capability"], e["tensorrt_version"]) !=
            (identity["compute_capability"], identity["tensorrt_version"])]
    manifest["engines"] = keep + entries
    write_text_atomic(bundle.root / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return entries
