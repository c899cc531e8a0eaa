"""The PyTorch reference pipeline (Algorithm 2): the condition once, K DDIM steps (sigma = 0) for an ensemble of N
noise draws batched together, the averaged latent decoded once, then a sigmoid; optional flip TTA merged by max.

Seeded and deterministic: the initial noise comes from ``diffiml.schedule.ensemble_noise`` (numpy), the same
function the runtime uses, so exported engines can be checked against this pipeline draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffiml.constants import LATENT_CHANNELS
from diffiml.schedule import DdimPlan, ddim_plan, ensemble_noise
from diffiml.train.ddim import ddim_update
from diffiml.train.model import DiffIML


@dataclass
class Sample:
    probability: torch.Tensor  # (B, 1, H, W) at model resolution, in [0, 1]
    member_probability: torch.Tensor | None  # (B, N, H, W) per ensemble member, when asked for


@torch.no_grad()
def denoise_from_condition(model: DiffIML, cond: torch.Tensor, noise: torch.Tensor, steps: int,
                           unet: Any = None, authors_order: bool = False, plan: DdimPlan | None = None) -> torch.Tensor:
    """The encoder's output (B, C, h, w); noise (N, 8, h, w), shared by every image -> final latents
    (B, N, 8, h, w). ``unet`` replaces ``model.unet``'s call (a compiled UNet, for Table 4). ``authors_order``: the
    authors' loop, one member at a time with the UNet's condition conv re-run at every step (Table 4's reference);
    otherwise the condition conv runs once and all members are one batch. ``plan``: other timesteps than the
    K-step DDIM schedule's (a distilled student's)."""
    b, n = cond.shape[0], noise.shape[0]
    plan = plan or ddim_plan(steps)
    call = unet or model.unet
    hoisted = None if authors_order else model.unet.condition_features(cond)
    finals = []
    for group in ([noise[i : i + 1] for i in range(n)] if authors_order else [noise]):
        z = group.to(cond.device, cond.dtype).repeat(b, 1, 1, 1)
        for t, c_x0, c_xt, sqrt_alpha in plan.steps():
            feats = model.unet.condition_features(cond) if hoisted is None else hoisted
            z0 = call(z, torch.full((z.shape[0],), t, dtype=torch.int64, device=z.device), feats)
            z = ddim_update(z, z0, c_x0, c_xt, sqrt_alpha)
        finals.append(z)
    return torch.stack(finals, dim=1) if authors_order else finals[0].view(b, n, *finals[0].shape[1:])


@torch.no_grad()
def denoise(model: DiffIML, image: torch.Tensor, noise: torch.Tensor, steps: int,
            plan: DdimPlan | None = None) -> torch.Tensor:
    """image (B, 3, H, W); noise (N, 8, h, w), shared by every image -> final latents (B, N, 8, h, w)."""
    return denoise_from_condition(model, model.encoder(image), noise, steps, plan=plan)


@torch.no_grad()
def decode_probability(model: DiffIML, latents: torch.Tensor) -> torch.Tensor:
    """Mask latents (..., 8, h, w) -> probability (..., H, W)."""
    lead = latents.shape[:-3]
    mask_latent = latents.reshape(-1, *latents.shape[-3:])[:, :LATENT_CHANNELS]
    prob = torch.sigmoid(model.vae.decode(mask_latent))
    return prob.view(*lead, *prob.shape[-2:])


@torch.no_grad()
def sample(model: DiffIML, image: torch.Tensor, steps: int = 8, ensemble: int = 5, seed: int = 0,
           tta: bool = False, members: bool = False, noise: np.ndarray | None = None,
           plan: DdimPlan | None = None) -> Sample:
    """image: (B, 3, H, W) ImageNet-normalized at the model's input size; ``plan`` replaces the ``steps``-step
    DDIM schedule (a distilled student's own)."""
    model.eval()
    h = image.shape[-1] // 8
    draws = ensemble * (2 if tta else 1)
    noise_np = ensemble_noise(seed, draws, (2 * LATENT_CHANNELS, h, h)) if noise is None else noise
    noise_t = torch.from_numpy(np.ascontiguousarray(noise_np))
    passes = [(image, noise_t[:ensemble], False)]
    if tta:
        passes.append((image.flip(-1), noise_t[ensemble:], True))
    probs, member_probs = [], []
    for img, nz, flipped in passes:
        z = denoise(model, img, nz, steps, plan)
        p = decode_probability(model, z.mean(dim=1)).unsqueeze(1)
        m = decode_probability(model, z) if members else None
        if flipped:
            p = p.flip(-1)
            m = m.flip(-1) if m is not None else None
        probs.append(p)
        member_probs.append(m)
    prob = torch.maximum(probs[0], probs[1]) if tta else probs[0]
    member = torch.cat(member_probs, dim=1) if members else None  # type: ignore[arg-type]
    return Sample(prob, member)
