"""Copy a trained DiffIML checkpoint into the repository as the shipped default model: weights only (no optimizer
state), stored in float16 to halve its size. Usage: python tools/ship_model.py RUN_DIR models/default"""

import json
import shutil
import sys
from pathlib import Path

import torch

from diffiml.export.exporter import load_diffiml
from diffiml.train.checkpoint import load_config, resolve_checkpoint, save_checkpoint

run, out = Path(sys.argv[1]), Path(sys.argv[2])
model, ckpt = load_diffiml(run)
config = load_config(ckpt)
state = json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())
config["trained_steps"] = state["step"]
tmp = out.with_name(out.name + ".build")
shutil.rmtree(tmp, ignore_errors=True)
final = save_checkpoint(tmp, model, config, dtype=torch.float16)
out.mkdir(parents=True, exist_ok=True)
for f in final.iterdir():
    shutil.copy(f, out / f.name)
shutil.rmtree(tmp)
print(f"shipped {ckpt} (step {state['step']}) to {out}")
