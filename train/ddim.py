"""The one DDIM update (eta = 0, clip_sample) in torch, for a model that predicts z0. The exported UNet-step graph,
the reference sampler and the torch benchmarks all call it; its coefficients come from ``diffiml.schedule``."""

from __future__ import annotations

import torch

from diffiml.constants import CLIP_SAMPLE_RANGE


def ddim_update(z_t: torch.Tensor, z0_hat: torch.Tensor, coef_x0: torch.Tensor | float,
                coef_xt: torch.Tensor | float, sqrt_alpha: torch.Tensor | float) -> torch.Tensor:
    """z_{t-1} = coef_x0 · clip(ẑ0) + coef_xt · (z_t − sqrt_alpha · ẑ0): diffusers' DDIMScheduler.step with the
    epsilon taken from the unclipped ẑ0, as diffusers does."""
    return coef_x0 * z0_hat.clamp(-CLIP_SAMPLE_RANGE, CLIP_SAMPLE_RANGE) + coef_xt * (z_t - sqrt_alpha * z0_hat)
