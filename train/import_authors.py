"""``diffiml import-authors``: a checkpoint written by the authors' training code -> our checkpoint folder.

IMDLBenCo saves ``{"model": state_dict, "optimizer": ..., "epoch": ..., "scaler": ..., "args": Namespace}``. The file
is read with ``torch.load(weights_only=True)`` only, never a full unpickle, which would run whatever code the file
names. One class besides tensors and plain values is allowed: ``argparse.Namespace``, which holds the run's options
(model name, image size) as plain values. The result is written the way ``save_checkpoint`` writes, to a temporary
folder renamed into place, so a refusal or a kill leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffiml.files import sha256_of
from diffiml.train.authors_mapping import AuthorsCheckpointError, authors_to_ours
from diffiml.train.checkpoint import CHECKPOINT_DIR, replace_folder

log = logging.getLogger(__name__)
SOURCE = "DiffIML authors' code (IMDLBenCo, github scu-zjz/DiffIML)"


def _allow_namespace() -> contextlib.AbstractContextManager:
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4 has only the process-wide list
    return contextlib.nullcontext()


def _load(path: Path) -> Any:
    try:
        with _allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is many lines of advice; the one fact the user needs is what was refused.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\.\s|$)", str(exc), re.S)
        detail = " ".join((found[1] if found else str(exc).splitlines()[0]).split())[:160]
        raise AuthorsCheckpointError(
            f"{path}: holds more than tensors and plain values ({detail}), and it is never unpickled here; if it "
            "is yours, re-save its weights alone: torch.save({'model': ckpt['model']}, NEW_FILE)") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        first = re.split(r"(?<=\.)\s", str(exc).strip(), maxsplit=1)[0]  # torch's first sentence, not its advice
        raise AuthorsCheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? "
                                     f"({' '.join(first.split())[:160] or type(exc).__name__})") from None


def read_authors_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Their file -> (state dict, saved args as a dict, epoch or None). Also takes a bare state dict or
    ``{"state_dict": ...}``, as their own loaders do."""
    path = Path(path)
    if not path.is_file():
        raise AuthorsCheckpointError(f"{path}: no such file")
    obj = _load(path)
    state, args, epoch = obj, {}, None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj:
                state, args, epoch = obj[key], obj.get("args") or {}, obj.get("epoch")
                break
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AuthorsCheckpointError(f"{path}: holds no state dict of tensors (found {type(state).__name__}); "
                                     "expected the authors' checkpoint, {'model': state_dict, ...}")
    return dict(state), dict(args) if isinstance(args, Mapping) else {}, epoch if isinstance(epoch, int) else None


def _write(out: Path, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    final = out / CHECKPOINT_DIR
    if final.exists():
        raise AuthorsCheckpointError(f"{final} already exists: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{CHECKPOINT_DIR}.", suffix=".tmp"))
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        return replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_authors(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Their checkpoint -> ``out/checkpoint`` (model.safetensors + config.json), ready for ``diffiml export out``;
    returns a summary for the command line."""
    checkpoint, out = Path(checkpoint), Path(out)
    state, args, epoch = read_authors_checkpoint(checkpoint)
    try:
        config, weights, assumed = authors_to_ours(state, args)
    except AuthorsCheckpointError as exc:
        raise AuthorsCheckpointError(f"{checkpoint}: {exc}") from None
    for note in assumed:
        log.warning("%s: assumed %s", checkpoint.name, note)
    source = {"code": SOURCE, "file": checkpoint.name, "sha256": sha256_of(checkpoint), "epoch": epoch,
              "assumed": assumed}
    final = _write(out, weights, {"kind": "diffiml", "model": config.to_json(), "imported_from": source})
    return {"out": str(out), "checkpoint": str(final), "config": config.name, "backbone": config.backbone,
            "image_size": config.image_size, "tensors": len(weights), "authors_tensors": len(state),
            "assumed": assumed}
