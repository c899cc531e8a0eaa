"""LightVAE distillation (eq. 6): L1 reconstruction of the +-1 map plus 0.01 * MSE to the latent mean of a frozen
Stable Diffusion VAE teacher (``sd-vae-ft-mse``, loaded from a local folder).

Without a teacher LightVAE trains as a plain mask autoencoder. It then gets a soft penalty that keeps its scaled
latents inside [-1, 1] instead: DDIM clips the predicted z0 to that range (``clip_sample=True``), so a latent
outside it could not be reproduced by the sampler.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffiml.constants import CLIP_SAMPLE_RANGE, DISTILL_LATENT_WEIGHT, LATENT_SCALE
from diffiml.train.light_vae import LightVAE

log = logging.getLogger(__name__)


def load_teacher(path: str | Path) -> nn.Module:
    from diffusers import AutoencoderKL

    teacher = AutoencoderKL.from_pretrained(str(path))
    teacher.requires_grad_(False)
    return teacher.eval()


class VaeDistillation(nn.Module):
    def __init__(self, vae: LightVAE, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.teacher = teacher
        if teacher is None:
            log.warning("no SD-VAE teacher given: training LightVAE as a plain mask autoencoder "
                        "(L1 reconstruction + a latent range penalty), not by distillation")

    def train(self, mode: bool = True) -> VaeDistillation:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def loss(self, image: torch.Tensor, mask: torch.Tensor, edge: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The same LightVAE encodes masks and edge maps, so it learns from both."""
        y = torch.cat([mask, edge], dim=0) * 2 - 1
        z = self.vae.encode(y)
        recon = F.l1_loss(self.vae.decode(z), y)
        if self.teacher is not None:
            with torch.no_grad():
                z_t = self.teacher.encode(y.repeat(1, 3, 1, 1)).latent_dist.mean * LATENT_SCALE
            return recon + DISTILL_LATENT_WEIGHT * F.mse_loss(z, z_t)
        return recon + DISTILL_LATENT_WEIGHT * F.relu(z.abs() - CLIP_SAMPLE_RANGE).pow(2).mean()
