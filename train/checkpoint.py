"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ optimizer state in safetensors and trainer state in
JSON). Nothing is pickled. A checkpoint is a folder written under a temporary name and swapped in by rename, so
a kill at any moment leaves the last good checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_DIR = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (holding ``checkpoint/``) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    for candidate in (path / CHECKPOINT_DIR, path, path / (CHECKPOINT_DIR + ".old")):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: no checkpoint here (expected model.safetensors and config.json)")


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors = {
        f"{idx}.{key}": (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def save_checkpoint(run_dir: str | Path, model: nn.Module, config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, trainer_state: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``run_dir/checkpoint`` atomically; ``dtype`` (e.g. float16) shrinks a checkpoint meant to ship."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = run_dir / CHECKPOINT_DIR, run_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(weights, str(tmp / "model.safetensors"))
    _write_json(tmp / "config.json", config)
    if optimizer is not None:
        tensors, meta = _optimizer_to_flat(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    if trainer_state is not None:
        _write_json(tmp / "trainer_state.json", trainer_state)
    return replace_folder(tmp, final)


def replace_folder(new: Path, final: Path) -> Path:
    """Swap a fully written folder in for ``final`` by renames: a kill at any moment leaves one of the two whole
    (``resolve_checkpoint`` also looks at ``NAME.old``)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_config(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(path) / "config.json").read_text())


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> None:
    ckpt = resolve_checkpoint(path)
    weights = load_file(str(ckpt / "model.safetensors"))
    reference = model.state_dict()
    weights = {k: v.to(reference[k].dtype) if k in reference else v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt}: weights do not fit the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")


def load_warm_start(path: str | Path, model: nn.Module) -> list[str]:
    """Every weight of ``model`` that a trained checkpoint holds, for a new run that starts from it; returns the
    names it did not hold (parts new in this config, e.g. a self-correlation stage, which keep their init).
    A weight of another shape or one the model lacks is an error, not a silent skip."""
    ckpt = resolve_checkpoint(path)
    stored = load_file(str(ckpt / "model.safetensors"))
    reference = model.state_dict()
    unexpected = sorted(set(stored) - set(reference))
    wrong = [k for k, v in stored.items() if k in reference and v.shape != reference[k].shape]
    if unexpected or wrong:
        raise CheckpointError(f"{ckpt}: cannot start from it (unexpected {unexpected[:3]}, other shape {wrong[:3]})")
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in stored.items()}, strict=False)
    return sorted(set(reference) - set(stored))


def load_lightvae(path: str | Path, vae: nn.Module) -> None:
    """A LightVAE from its own run (``train-vae``) or from the ``vae.`` part of a DiffIML checkpoint, so a new
    diffusion model can reuse the latent space of an earlier one."""
    ckpt = resolve_checkpoint(path)
    if json.loads((ckpt / "config.json").read_text()).get("kind") != "diffiml":
        load_weights(ckpt, vae)
        return
    stored = load_file(str(ckpt / "model.safetensors"))
    weights = {k.removeprefix("vae."): v for k, v in stored.items() if k.startswith("vae.")}
    reference = vae.state_dict()
    if set(weights) != set(reference) or any(v.shape != reference[k].shape for k, v in weights.items()):
        raise CheckpointError(f"{ckpt}: its LightVAE does not fit this config")
    vae.load_state_dict({k: v.to(reference[k].dtype) for k, v in weights.items()})


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    if not (ckpt / "optimizer.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: no optimizer state to resume from")
    meta = json.loads((ckpt / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_flat(load_file(str(ckpt / "optimizer.safetensors")), meta))
    return json.loads((ckpt / "trainer_state.json").read_text())
