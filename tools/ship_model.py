"""Copy a trained DiffIML checkpoint into the repository as the shipped default model: weights only (no optimizer
state), in float32 by default (the exact weights that were evaluated) or float16 with --fp16. With --unet-only (for
a student of ``diffiml distill``, shipped beside its teacher): only the UNet's tensors, since the rest is the
teacher's (export checks that it is).
Usage: python tools/ship_model.py RUN_OR_SNAPSHOT models/default [--fp16] [--unet-only]"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffiml.export.exporter import load_diffiml
from diffiml.train.checkpoint import load_config, resolve_checkpoint, save_checkpoint

args = [a for a in sys.argv[1:] if not a.startswith("--")]
run, out = Path(args[0]), Path(args[1])
model, ckpt = load_diffiml(run)
config = load_config(ckpt)
state = json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())
config["trained_steps"] = state["step"]
tmp = out.with_name(out.name + ".build")
shutil.rmtree(tmp, ignore_errors=True)
final = save_checkpoint(tmp, model, config, dtype=torch.float16 if "--fp16" in sys.argv else None)
if "--unet-only" in sys.argv:
    weights = load_file(str(final / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k.startswith("unet.")}, str(final / "model.safetensors"))
out.mkdir(parents=True, exist_ok=True)
for f in final.iterdir():
    shutil.copy(f, out / f.name)
shutil.rmtree(tmp)
print(f"shipped {ckpt} (step {state['step']}) to {out}")
