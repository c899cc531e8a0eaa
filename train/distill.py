"""Progressive distillation (Salimans & Ho, ICLR 2022) of the denoising UNet: a student that takes one DDIM step
where its teacher takes two, so K steps become K/2 at (nearly) the teacher's output. Rounds chain: 8 -> 4 -> 2.

What the student is: the teacher's network, warm-started from the teacher's weights. Only the UNet learns; the
condition encoder, the UNet's condition entry (which export folds into the encoder graph) and the LightVAE stay the
teacher's, so a bundle can carry the student's UNet graph beside the teacher's and share everything else.

Where the training states come from: the teacher's own sampler, run from the runtime's noise on an image (DDIM,
sigma = 0). The state at every other teacher timestep is an input, and the state two teacher steps later is where
one student step must land. No mask is read: untouched photographs train it as well as forgeries.

The target, for this model's ``prediction_type = sample`` (the UNet predicts the clean latent z0). A deterministic
DDIM step is ``z'' = a'' * x + (s''/s) * (z - a * x)`` with a = sqrt(alpha-bar), s = sqrt(1 - alpha-bar) at the
step's two timesteps. The x that lands exactly on the teacher's two-step state z'' is
``x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a)``, and the student regresses x~. Salimans & Ho show that an
epsilon-predicting student fails here (x = (z - s * eps) / a divides by a ~ 0.02 at t = 875), and that predicting x
(or v) is stable; our UNet already predicts x, so the exported graph and every backend stay as they are. The loss is
their "truncated SNR" weighting, max(alpha-bar / (1 - alpha-bar), 1) * |x - x~|^2: what a step's error costs in
the latent it lands on, without vanishing at high noise. The runtime clips x to [-1, 1] before the update; the
target is the unclipped one, and the share of target values the clip would change is logged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffiml.constants import DEFAULT_STEPS, LATENT_CHANNELS, LATENT_DOWNSAMPLE
from diffiml.schedule import DdimPlan, alphas_cumprod, ddim_plan, plan_through
from diffiml.train.checkpoint import load_config, load_weights, resolve_checkpoint
from diffiml.train.config import ModelConfig
from diffiml.train.ddim import ddim_update
from diffiml.train.model import DiffIML
from diffiml.train.trainer import TrainOptions, train

log = logging.getLogger(__name__)

#: The config key that records a distilled checkpoint's timesteps (exported as its sampling plan).
DISTILLED_KEY = "distilled"


def student_plan(teacher: DdimPlan) -> DdimPlan:
    """Every other timestep of the teacher's: each student step spans two teacher steps."""
    if len(teacher.timesteps) % 2:
        raise ValueError(f"a {len(teacher.timesteps)}-step teacher cannot be halved: distill from an even step count")
    return plan_through(teacher.timesteps[::2])


def distillation_target(z: torch.Tensor, z_two_steps: torch.Tensor, c_x0: torch.Tensor, c_xt: torch.Tensor,
                        sqrt_alpha: torch.Tensor) -> torch.Tensor:
    """The clean-latent prediction x~ whose (unclipped) DDIM step of the student's plan takes ``z`` to
    ``z_two_steps``; the coefficients are the student step's, broadcastable to ``z``."""
    return (z_two_steps - c_xt * z) / (c_x0 - c_xt * sqrt_alpha)


def plan_tensors(plan: DdimPlan, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(getattr(plan, k)), device=device)
            for k in ("timesteps", "coef_x0", "coef_xt", "sqrt_alpha")}


@torch.no_grad()
def teacher_trajectory(unet: nn.Module, cond: torch.Tensor, noise: torch.Tensor, plan: DdimPlan) -> torch.Tensor:
    """States of the teacher's sampler (B, K + 1, 8, h, w): the noise, then after each of its K steps."""
    z, states = noise, [noise]
    for t, c_x0, c_xt, sqrt_alpha in plan.steps():
        z0 = unet(z, torch.full((z.shape[0],), t, dtype=torch.int64, device=z.device), cond)
        z = ddim_update(z, z0, c_x0, c_xt, sqrt_alpha)
        states.append(z)
    return torch.stack(states, dim=1)


class ProgressiveDistillation(nn.Module):
    """One round: ``loss(image, ...)`` for the trainer, the student's weights in ``self.student`` (a full DiffIML,
    so its checkpoint exports like any other)."""

    def __init__(self, teacher: DiffIML, teacher_plan: DdimPlan) -> None:
        super().__init__()
        self.student = copy.deepcopy(teacher)
        self.teacher_unet = teacher.unet
        self.teacher_unet.requires_grad_(False)
        self.teacher_plan, self.plan = teacher_plan, student_plan(teacher_plan)
        self.student.requires_grad_(False)
        self.student.unet.requires_grad_(True)
        self.student.unet.condition_entry.requires_grad_(False)  # part of the shared encoder graph
        snr = alphas_cumprod()[self.plan.timesteps]
        self.register_buffer("weight", torch.tensor(np.maximum(snr / (1 - snr), 1.0), dtype=torch.float32),
                             persistent=False)
        self.clipped_share = 0.0  # of the last batch's targets, outside the runtime's clip range

    def train(self, mode: bool = True) -> ProgressiveDistillation:
        """Everything stays in eval mode (the encoder's BatchNorm statistics are the teacher's); the UNet has no
        layer that behaves differently in training."""
        return super().train(False)

    @torch.no_grad()
    def targets(self, image: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W), noise (B, 8, h, w) -> condition features (B, C, h, w), the student's start states
        (B, k, 8, h, w) at its k timesteps and its targets x~ (B, k, 8, h, w): one step from state i with x~_i
        lands where two teacher steps from it do."""
        cond = self.student.unet.condition_features(self.student.encoder(image))
        states = teacher_trajectory(self.teacher_unet, cond, noise, self.teacher_plan)
        k = len(self.plan.timesteps)
        p, shape = plan_tensors(self.plan, image.device), (1, k, 1, 1, 1)
        z = states[:, 0:-1:2]
        target = distillation_target(z, states[:, 2::2], p["coef_x0"].view(shape), p["coef_xt"].view(shape),
                                     p["sqrt_alpha"].view(shape))
        return cond, z, target

    def loss(self, image: torch.Tensor, mask: torch.Tensor | None = None, edge: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        h = image.shape[-1] // LATENT_DOWNSAMPLE
        noise = torch.randn((image.shape[0], 2 * LATENT_CHANNELS, h, h), generator=generator, device=image.device)
        cond, z, target = self.targets(image, noise)
        self.clipped_share = float((target.abs() > 1).float().mean())
        b, k = z.shape[:2]
        t = torch.as_tensor(self.plan.timesteps, device=image.device).repeat(b)
        pred = self.student.unet(z.flatten(0, 1), t, cond).unflatten(0, (b, k))
        per_step = ((pred - target) ** 2).mean(dim=(0, 2, 3, 4))
        return (self.weight * per_step).mean()


def distilled_config(teacher_config: dict, plan: DdimPlan, teacher_sha256: str) -> dict:
    """The student checkpoint's config: the teacher's, plus the plan it was distilled for."""
    return {**teacher_config, DISTILLED_KEY: {"timesteps": [int(t) for t in plan.timesteps],
                                              "teacher_sha256": teacher_sha256}}


def checkpoint_plan(config: dict) -> DdimPlan | None:
    """A distilled checkpoint's own plan, or None for a model trained on the full schedule."""
    distilled = config.get(DISTILLED_KEY)
    return plan_through(distilled["timesteps"]) if distilled else None


def round_folders(out: Path, teacher_steps: int, to_steps: int) -> list[tuple[int, Path]]:
    """(student steps, run folder) of each round: 8 -> 2 is [(4, OUT/steps-4), (2, OUT/steps-2)]."""
    rounds, k = [], teacher_steps
    while k > to_steps:
        if k % 2:
            raise ValueError(f"cannot halve {k} steps on the way to {to_steps}: choose a power-of-two ratio")
        k //= 2
        rounds.append((k, out / f"steps-{k}"))
    if k != to_steps or not rounds:
        raise ValueError(f"{to_steps} steps is not a halving of the teacher's {teacher_steps}")
    return rounds


def finished(run: Path, steps: int) -> bool:
    state = run / "checkpoint" / "trainer_state.json"
    return state.is_file() and int(json.loads(state.read_text())["step"]) >= steps


def distill_rounds(teacher: str | Path, dataset: Any, out: str | Path, to_steps: int, options: TrainOptions,
                   resume: bool = False) -> list[dict]:
    """Run every round from ``teacher`` down to ``to_steps``; each round's teacher is the previous round's student.
    A finished round is kept; with ``resume`` an unfinished one continues where it was killed."""
    out = Path(out)
    config = load_config(teacher)
    plan = checkpoint_plan(config) or ddim_plan(int(config["model"].get("steps", DEFAULT_STEPS)))
    source, summary = Path(teacher), []
    for steps, run in round_folders(out, len(plan.timesteps), to_steps):
        if finished(run, options.steps):
            log.info("round to %d steps: already finished in %s", steps, run)
        else:
            if (run / "checkpoint").exists() and not resume:
                raise ValueError(f"{run} already holds a checkpoint: pass --resume to continue it, or another --out")
            model = DiffIML(ModelConfig.from_json(config["model"]))
            load_weights(source, model)
            round_ = ProgressiveDistillation(model, plan)
            sha = hashlib.sha256((resolve_checkpoint(source) / "model.safetensors").read_bytes()).hexdigest()
            losses = train(round_, dataset, run, distilled_config(config, round_.plan, sha), options,
                           resume=(run / "checkpoint").exists(), save_module=round_.student)
            log.info("round to %d steps: last loss %.5f, targets outside the clip range %.4f", steps,
                     losses[-1] if losses else float("nan"), round_.clipped_share)
            if not finished(run, options.steps):  # stopped early (--stop-after): the next round needs this one
                log.info("round to %d steps stopped before its end; continue with --resume", steps)
                break
        config = load_config(run)
        plan = checkpoint_plan(config)
        assert plan is not None
        source = run
        summary.append({"steps": steps, "run": str(run), "timesteps": [int(t) for t in plan.timesteps]})
    return summary
