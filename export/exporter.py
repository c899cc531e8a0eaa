"""Checkpoint -> engine bundle: three ONNX graphs + manifest.json, each graph checked against PyTorch.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The torch.export-based exporter (the
default since PyTorch 2.9) cannot express the UNet's condition broadcast, where the member batch is a multiple of
the image batch (two related symbolic dimensions), without extra shape guards; the TorchScript exporter traces the
same graph with named dynamic axes, at opset 17 (LayerNormalization is one node, as TensorRT wants it).
Every graph is fixed at the bundle's input size; only batch dimensions are dynamic.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import load_file

import diffiml
from diffiml.constants import CLIP_SAMPLE_RANGE, DEFAULT_STEPS, IMAGE_MEAN, IMAGE_STD
from diffiml.export.attention import FUSED_DOMAIN, attention_for_export
from diffiml.export.graphs import GraphSpec, graph_specs
from diffiml.export.precision_check import graph_entry
from diffiml.files import write_bytes_atomic
from diffiml.runtime.bundle import FORMAT_VERSION, load_bundle, sha256_of, student_graph_name
from diffiml.runtime.copy_move import CopyMoveCue
from diffiml.runtime.detector import DETECTOR_FILE, Detector
from diffiml.schedule import ddim_plan
from diffiml.train.checkpoint import load_config, load_weights, replace_folder, resolve_checkpoint
from diffiml.train.config import ModelConfig
from diffiml.train.distill import DISTILLED_KEY, checkpoint_plan
from diffiml.train.model import DiffIML

log = logging.getLogger(__name__)
OPSET = 17
FP32_TOLERANCE = 1e-4
SUPPORTED_STEPS = (1, 2, 4, 5, 8, 10, 20)


class ExportError(RuntimeError):
    """A graph that does not export, or does not match PyTorch within tolerance."""


def load_diffiml(checkpoint: str | Path) -> tuple[DiffIML, Path]:
    ckpt = resolve_checkpoint(checkpoint)
    config = load_config(ckpt)
    if config.get("kind", "diffiml") != "diffiml":
        raise ExportError(f"{ckpt}: a {config.get('kind')} checkpoint; only DiffIML checkpoints export to bundles")
    model = DiffIML(ModelConfig.from_json(config["model"]))
    load_weights(ckpt, model)
    return model.eval(), ckpt


def export_graph(spec: GraphSpec, module: torch.nn.Module, sizes: dict[str, int], attention: str = "fused") -> bytes:
    sample = spec.sample_inputs(sizes)
    dynamic_axes = {
        t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*spec.inputs, *spec.outputs)
    }
    buffer = io.BytesIO()
    with torch.no_grad(), attention_for_export(module, attention):
        torch.onnx.export(
            module, tuple(sample.values()), buffer, dynamo=False, opset_version=OPSET,
            custom_opsets={FUSED_DOMAIN: 1} if attention == "fused" else None,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v}, do_constant_folding=True,
        )
    return buffer.getvalue()


def check_against_torch(spec: GraphSpec, module: torch.nn.Module, onnx_bytes: bytes,
                        batch_sizes: list[dict[str, int]], tolerance: float = FP32_TOLERANCE) -> float:
    """onnx.checker, then onnxruntime (CPU) against PyTorch on random inputs at each batch size; the max |diff|."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    worst = 0.0
    for k, sizes in enumerate(batch_sizes):
        sample = spec.sample_inputs(sizes, seed=100 + k)
        with torch.no_grad():
            expected = module(*sample.values()).numpy()
        got = session.run(None, {n: v.numpy() for n, v in sample.items()})[0]
        err = float(np.abs(got - expected).max())
        worst = max(worst, err)
        if got.shape != expected.shape or err > tolerance:
            raise ExportError(f"{spec.name}: onnxruntime differs from PyTorch at batch {sizes}: shape {got.shape} vs "
                              f"{expected.shape}, max |diff| {err:.3g} > {tolerance:g}")
    return worst



def fitted_detector(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``detector.json``, refused when it was fitted on other weights (its evidence would differ)."""
    path = checkpoint / DETECTOR_FILE
    try:
        entry = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable detector ({exc})") from None
    fitted_on = entry.get("record", {}).get("checkpoint_sha256") if isinstance(entry, dict) else None
    if fitted_on != sha256_of(checkpoint / "model.safetensors"):
        raise ExportError(f"{path}: fitted on another checkpoint; fit it again with `diffiml fit-detector` or "
                          "export with --no-detector")
    Detector.from_manifest(entry, str(path))
    return entry


def load_student(path: str | Path, teacher: DiffIML) -> tuple[DiffIML, Path]:
    """A checkpoint distilled from ``teacher`` (``diffiml distill``) as a model. Its file may hold the whole model or
    only the UNet's tensors (how a student ships beside its teacher); whatever it holds outside the distilled part
    (the encoder, the UNet's condition entry, the LightVAE: what a bundle's student shares with its teacher) must be
    the teacher's, or it was distilled from another checkpoint and is refused."""
    ckpt = resolve_checkpoint(path)
    config = load_config(ckpt)
    if checkpoint_plan(config) is None:
        raise ExportError(f"{ckpt}: not a distilled checkpoint (its config has no {DISTILLED_KEY!r} plan)")
    if ModelConfig.from_json(config["model"]) != teacher.config:
        raise ExportError(f"{ckpt}: a student of another architecture than the bundle's model")
    stored = load_file(str(ckpt / "model.safetensors"))
    reference = teacher.state_dict()
    missing = [k for k in reference if k.startswith("unet.") and k not in stored]
    unexpected = [k for k in stored if k not in reference]
    if missing or unexpected:
        raise ExportError(f"{ckpt}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    shared = [k for k in stored if not k.startswith("unet.") or k.startswith("unet.condition_entry.")]
    differ = [k for k in shared if not torch.equal(stored[k].to(reference[k].dtype), reference[k])]
    if differ:
        raise ExportError(f"{ckpt}: its encoder, condition entry or LightVAE differ from the teacher's "
                          f"({', '.join(differ[:3])}); it was distilled from another checkpoint")
    student = copy.deepcopy(teacher)
    student.load_state_dict({**reference, **{k: v.to(reference[k].dtype) for k, v in stored.items()}})
    return student.eval(), ckpt


def export_students(model: DiffIML, students: list[Path], staging: Path, out: Path, attention: str,
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, float]]:
    """Each distilled checkpoint's UNet-step graph, checked like the teacher's -> (graph entries, schedules naming
    them, manifest records, parity checks)."""
    graphs: dict[str, Any] = {}
    schedules: dict[str, Any] = {}
    records: dict[str, Any] = {}
    checks: dict[str, float] = {}
    for path in students:
        student, ckpt = load_student(path, model)
        plan = checkpoint_plan(load_config(ckpt))
        assert plan is not None
        k = len(plan.timesteps)
        gname = student_graph_name(k)
        if gname in graphs:
            raise ExportError(f"two students for {k} steps")
        spec, module = graph_specs(student)["unet"]
        data = export_graph(spec, module, {"images": 2, "members": 4, "latents": 2}, attention)
        checks[gname] = check_against_torch(spec, module, data, [{"images": 1, "members": 3, "latents": 1},
                                                                 {"images": 2, "members": 4, "latents": 3}])
        write_bytes_atomic(staging / f"{gname}.onnx", data)
        graphs[gname] = graph_entry(staging / f"{gname}.onnx", "fp32", [t.to_json() for t in spec.inputs],
                                    [t.to_json() for t in spec.outputs])
        schedules[str(k)] = {**plan.to_json(), "unet": gname}
        records[gname] = {"steps": k, "checkpoint": {"path": os.path.relpath(ckpt.resolve(), out.resolve()),
                                                     "sha256": sha256_of(ckpt / "model.safetensors")}}
        log.info("%s: the %d-step student, max |onnxruntime - torch| = %.2e", gname, k, checks[gname])
    return graphs, schedules, records, checks


def export_bundle(checkpoint: str | Path, out: str | Path, name: str | None = None,
                  steps: tuple[int, ...] = SUPPORTED_STEPS, attention: str = "fused",
                  int8_calibration: list[Path] | None = None, check_images: list[Path] | None = None,
                  int8_min_agreement: float | None = None, fp16: bool = False, copy_move_cue: bool = True,
                  detector: bool = True, students: list[Path] | None = None) -> dict[str, Any]:
    """Write the bundle into ``out`` (replacing it only once everything passed) and return its manifest.

    ``attention="fused"`` (for onnxruntime) writes the UNet's attention as one fused operator; "standard" keeps plain
    ONNX ops, which TensorRT's parser needs (``diffiml.export.attention``). With ``int8_calibration`` images, the
    bundle also carries int8 graphs (``diffiml.export.quantize``); with ``fp16``, fp16 graphs for CUDA
    (``diffiml.export.half``). Each reduced precision is compared with fp32 on ``check_images``. With
    ``copy_move_cue``, the manifest enables the runtime's classical copy-move cue (runtime/copy_move.py). With
    ``detector`` and a ``detector.json`` beside the checkpoint (``diffiml fit-detector``), the manifest carries the
    calibrated image-level detector (runtime/detector.py); it must have been fitted on this checkpoint.

    ``students``: checkpoints distilled from this one (``diffiml distill``). Each adds its UNet-step graph
    (``unet_kK``) and makes its own plan the K-step schedule, so ``--steps K`` runs it. A distilled checkpoint
    exported on its own runs its plan as its default steps (how ``bench curve`` scores distillation snapshots)."""
    torch.manual_seed(0)
    model, ckpt = load_diffiml(checkpoint)
    cfg = model.config
    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    graphs: dict[str, Any] = {}
    checks: dict[str, float] = {}
    for gname, (spec, module) in graph_specs(model).items():
        module.eval()
        data = export_graph(spec, module, {"images": 2, "members": 4, "latents": 2}, attention)
        checks[gname] = check_against_torch(
            # Small batches: at the paper size one member's UNet attention alone holds 1 GiB per framework.
            spec, module, data, [{"images": 1, "members": 3, "latents": 1}, {"images": 2, "members": 4, "latents": 3}]
        )
        file = f"{gname}.onnx"
        write_bytes_atomic(staging / file, data)
        graphs[gname] = graph_entry(staging / file, "fp32", [t.to_json() for t in spec.inputs],
                                    [t.to_json() for t in spec.outputs])
        log.info("%s: exported, max |onnxruntime - torch| = %.2e", gname, checks[gname])

    all_steps = sorted({*steps, cfg.steps, DEFAULT_STEPS})
    schedules = {str(k): ddim_plan(k).to_json() for k in all_steps}
    own_plan = checkpoint_plan(load_config(ckpt))
    default_steps = cfg.steps
    if own_plan is not None:  # a student exported alone: its graph is the bundle's UNet, its plan the default
        default_steps = len(own_plan.timesteps)
        schedules[str(default_steps)] = own_plan.to_json()
    student_graphs, student_schedules, student_records, student_checks = export_students(
        model, [Path(p) for p in students or []], staging, out, attention)
    graphs.update(student_graphs)
    schedules.update(student_schedules)
    checks.update(student_checks)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or out.name,
        "model": cfg.to_json(),
        "checkpoint": {"path": os.path.relpath(ckpt.resolve(), out.resolve()),
                       "sha256": sha256_of(ckpt / "model.safetensors")},
        "input": {"size": [cfg.image_size, cfg.image_size], "layout": "NCHW", "color": "RGB", "scale": 1 / 255,
                  "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "resize": "area"},
        "latent": {"channels": 8, "mask_channels": 4, "size": [cfg.latent_size, cfg.latent_size]},
        "sampling": {
            "default_steps": default_steps,
            "default_ensemble": cfg.ensemble,
            "clip_sample": CLIP_SAMPLE_RANGE, "prediction_type": "sample", "eta": 0.0,
            "schedules": dict(sorted(schedules.items(), key=lambda kv: int(kv[0]))),
        },
        "graphs": graphs,
        **({"students": student_records} if student_records else {}),
        **({"copy_move_cue": CopyMoveCue().manifest()} if copy_move_cue else {}),
        **({"detector": fitted_detector(ckpt)} if detector and (ckpt / DETECTOR_FILE).is_file() else {}),
        "checks": {"fp32_max_abs_error_vs_torch": checks},
        "opset": OPSET,
        "attention": attention,
        "producer": {"diffiml": diffiml.__version__, "torch": torch.__version__.split("+")[0],
                     "onnx": onnx.__version__, "exporter": "torch.onnx.export(dynamo=False)"},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    load_bundle(staging)  # the runtime's own validation, before the bundle replaces anything
    precisions: dict[str, Any] = {}
    if int8_calibration:
        from diffiml.export.quantize import MIN_MASK_AGREEMENT, add_int8

        threshold = MIN_MASK_AGREEMENT if int8_min_agreement is None else int8_min_agreement
        precisions["int8"] = add_int8(staging, int8_calibration, check_images or int8_calibration[-4:],
                                      min_agreement=threshold)
    if fp16:
        from diffiml.export.half import add_fp16

        precisions["fp16"] = add_fp16(staging, check=check_images or [])
    if precisions:
        manifest["precisions"] = precisions
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        load_bundle(staging)
    replace_folder(staging, out)
    return manifest
