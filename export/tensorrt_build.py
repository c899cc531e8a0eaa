"""``diffiml build-engines``: one TensorRT engine per bundle graph, with the TensorRT 10 Python API.

ONNX parser into a *strongly typed* network: every tensor keeps the type the graph gives it, so precision is the
bundle's graphs' (fp32 engines from the fp32 graphs, fp16 engines from the bundle's fp16 graphs, whose
normalizations, softmax, sigmoid and DDIM update the exporter kept in fp32: ``export/half.py``, DEPLOY.md).
TensorRT's weakly typed builds with precision flags are deprecated and go in TensorRT 11. One optimization profile
over the batch dimensions (images 1..max_batch, members up to max_batch x ensemble, including flip TTA); a timing
cache in the bundle per GPU kind and TensorRT version (one file each: caches of another GPU are not shared or
overwritten); each engine recorded in the manifest with the GPU's compute capability and the TensorRT version it is
bound to (and both in its file name).

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
from diffiml.runtime.bundle import load_bundle, sha256_of

log = logging.getLogger(__name__)
ENGINE_PRECISIONS = ("fp32", "fp16")  # the precisions a bundle carries graphs for, that TensorRT builds from


def timing_cache_name(identity: dict[str, str]) -> str:
    """One timing cache per GPU kind and TensorRT version: a cache of another GPU would be refused or overwritten."""
    return f"timing.sm{identity['compute_capability'].replace('.', '')}.trt{identity['tensorrt_version']}.cache"


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


def build_engine(onnx_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]], cache_path: Path) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError(f"{cache_path}: TensorRT refused this timing cache (another GPU or TensorRT wrote it); "
                           "delete it to start a new one")
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
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"build-engines: precision {precision!r}: TensorRT builds from the bundle's own graphs "
                         f"(strongly typed), and bundles carry {ENGINE_PRECISIONS} graphs")
    if precision not in bundle.precisions:
        raise ValueError(f"{bundle_dir}: no {precision} graphs to build from; export with "
                         f"`diffiml export --precision fp32,{precision} --attention standard`")
    for name in bundle.graph_names:  # with each distilled UNet (unet_kK)
        if foreign := bundle.graph(name, precision).nonstandard_domains:
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
    for name in bundle.graph_names:  # with each distilled UNet (unet_kK)
        graph = bundle.graph(name, precision)  # a precision's graphs have the fp32 graphs' inputs (fp32 I/O)
        data = build_engine(graph.path, batch_profile(bundle.manifest["graphs"][name], max_batch, members),
                            bundle.root / timing_cache_name(identity))
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
