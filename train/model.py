"""DiffIML: condition encoder + denoising UNet + frozen LightVAE, and its training objective (Algorithm 1)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffiml.constants import LATENT_CHANNELS, NUM_TRAIN_TIMESTEPS, PRIOR_RATE, SEGMENTATION_WEIGHT
from diffiml.schedule import alphas_cumprod
from diffiml.train.condition_encoder import ConditionEncoder
from diffiml.train.config import ModelConfig
from diffiml.train.light_vae import LightVAE
from diffiml.train.unet import DenoisingUNet


class DiffIML(nn.Module):
    def __init__(self, config: ModelConfig, pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = ConditionEncoder(config, pretrained)
        self.unet = DenoisingUNet(config, latent_channels=2 * LATENT_CHANNELS)
        self.vae = LightVAE(config.vae_channels)
        self.vae.requires_grad_(False)
        self.register_buffer(
            "alphas_cumprod", torch.tensor(alphas_cumprod(), dtype=torch.float32), persistent=False
        )

    def train(self, mode: bool = True) -> DiffIML:
        """The LightVAE stays in eval mode: the authors froze only its gradients, and its BatchNorm drifted."""
        super().train(mode)
        self.vae.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def target_latents(self, mask: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        """{0,1} mask and edge (B, 1, H, W) -> z0 (B, 8, h, w): mask latent then edge latent."""
        return torch.cat([self.vae.encode(mask * 2 - 1), self.vae.encode(edge * 2 - 1)], dim=1)

    def loss(
        self, image: torch.Tensor, mask: torch.Tensor, edge: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Algorithm 1 with the error prior of eq. 15 and the weighted latent MSEs of eq. 8-10."""
        z0 = self.target_latents(mask, edge)
        b = z0.shape[0]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=generator, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        xi = torch.randn(z0.shape, generator=generator, device=z0.device)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1)
        z_t = a.sqrt() * (z0 + PRIOR_RATE * xi) + (1 - a).sqrt() * eps
        cond = self.unet.condition_features(self.encoder(image))
        pred = self.unet(z_t, t, cond)
        seg = F.mse_loss(pred[:, :LATENT_CHANNELS], z0[:, :LATENT_CHANNELS])
        edg = F.mse_loss(pred[:, LATENT_CHANNELS:], z0[:, LATENT_CHANNELS:])
        return SEGMENTATION_WEIGHT * seg + (1 - SEGMENTATION_WEIGHT) * edg


class DiscriminativeBaseline(nn.Module):
    """Table 5's baseline: the same condition encoder with a light 1x1 head, trained with BCE + Dice."""

    def __init__(self, config: ModelConfig, pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = ConditionEncoder(config, pretrained)
        self.classifier = nn.Conv2d(config.head_channels, 1, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> mask logits (B, 1, H, W)."""
        logits = self.classifier(self.encoder(image))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def loss(
        self, image: torch.Tensor, mask: torch.Tensor, edge: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        logits = self(image)
        bce = F.binary_cross_entropy_with_logits(logits, mask)
        prob = torch.sigmoid(logits)
        inter = (prob * mask).sum(dim=(1, 2, 3))
        dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + 1)
        return bce + dice.mean()


def build_model(config: ModelConfig, baseline: bool = False, pretrained: str | Path | None = None) -> nn.Module:
    return DiscriminativeBaseline(config, pretrained) if baseline else DiffIML(config, pretrained)
