"""The PyTorch reference behind the runtime's interface (``diffiml localize --reference``): the checkpoint's own
PyTorch modules (the same three deployment wrappers that export traces) run through the runtime's plan, with the
same decoding, preprocessing, noise and post-processing as ``Localizer``. A user compares it with an engine bundle
on their own images; the independent sampler of ``diffiml.train.sampler`` is what the parity tests compare with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffiml.export.exporter import load_diffiml, load_student
from diffiml.export.graphs import graph_specs
from diffiml.runtime.backends.base import Backend, HostStepLoop
from diffiml.runtime.bundle import Bundle, load_bundle, sha256_of
from diffiml.runtime.errors import BundleError
from diffiml.runtime.localizer import AdaptiveEnsemble, Localizer, parse_ensemble
from diffiml.train.model import DiffIML


class TorchEngine:
    """One deployment wrapper behind the runtime's ``Engine`` interface: numpy in, numpy out, by tensor name."""

    def __init__(self, module: nn.Module, inputs: list[str], outputs: list[str]) -> None:
        self.module, self.inputs, self.outputs = module.eval(), inputs, outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.inputs))
        return {self.outputs[0]: out.numpy()}


def torch_engines(model: DiffIML) -> dict[str, TorchEngine]:
    return {name: TorchEngine(module, [t.name for t in spec.inputs], [t.name for t in spec.outputs])
            for name, (spec, module) in graph_specs(model).items()}


def torch_backend(checkpoint: str | Path, students: dict[str, Path] | None = None) -> Backend:
    """``students``: checkpoint folders of the bundle's distilled UNets, by graph name."""
    model, _ = load_diffiml(checkpoint)
    engines = torch_engines(model)
    loops = {name: HostStepLoop(torch_engines(load_student(path, model)[0])["unet"])
             for name, path in (students or {}).items()}
    return Backend("torch-reference", dict(engines), HostStepLoop(engines["unet"]), student_loops=dict(loops))


def bundle_students(bundle: Bundle) -> dict[str, Path]:
    """The checkpoints of the bundle's distilled UNets, each checked against the sha256 the manifest recorded."""
    found = {}
    for name, record in bundle.manifest.get("students", {}).items():
        path = (bundle.root / record["checkpoint"]["path"]).resolve()
        weights = path / "model.safetensors"
        if not weights.is_file() or sha256_of(weights) != record["checkpoint"]["sha256"]:
            raise BundleError(f"{weights}: missing or not the student this bundle was exported from")
        found[name] = path
    return found


def open_reference(bundle_dir: str | Path, checkpoint: str | Path | None = None, steps: int | None = None,
                   ensemble: int | str | None = None, tta: bool = False, seed: int = 0, uncertainty: bool = False,
                   adaptive: AdaptiveEnsemble | None = None, copy_move: bool = True,
                   follow_decision: bool = False) -> Localizer:
    """A Localizer on the PyTorch modules of ``checkpoint``, which defaults to the one the bundle was exported from
    (its sha256 is checked)."""
    bundle = load_bundle(bundle_dir, verify=False)
    if checkpoint is None:
        checkpoint = bundle.checkpoint_path()
        weights = Path(checkpoint) / "model.safetensors"
        if not weights.is_file() or sha256_of(weights) != bundle.manifest["checkpoint"]["sha256"]:
            raise BundleError(f"{weights}: missing or not the checkpoint this bundle was exported from")
    n, adaptive = parse_ensemble(ensemble, bundle.default_ensemble, adaptive)
    students = bundle_students(bundle) if bundle.distilled_steps else {}
    return Localizer(bundle, torch_backend(checkpoint, students), steps or bundle.default_steps, n, tta, seed,
                     uncertainty, adaptive, copy_move, follow_decision)
