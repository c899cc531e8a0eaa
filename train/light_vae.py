"""LightVAE: the small, attention-free mask autoencoder distilled from the Stable Diffusion VAE (paper 3.2)."""

from __future__ import annotations

import torch
from torch import nn

from diffiml.constants import LATENT_CHANNELS, LATENT_SCALE


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=False),
    )


class LightVAE(nn.Module):
    """Encodes a {-1, +1} map (B, 1, H, W) to a scaled latent (B, 4, H/8, W/8) and back.

    ``encode`` returns latents already multiplied by the SD latent scale; ``decode`` divides it out, so the
    diffusion model only ever sees scaled latents.
    """

    def __init__(self, channels: list[int] | tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.encoder = nn.Sequential(_down(1, c1), _down(c1, c2), _down(c2, c3), nn.Conv2d(c3, LATENT_CHANNELS, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(LATENT_CHANNELS, c3, 1),
            _up(c3, c2),
            _up(c2, c1),
            _up(c1, c1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, 1, 3, padding=1),
        )

    def encode(self, pm1_map: torch.Tensor) -> torch.Tensor:
        return self.encoder(pm1_map) * LATENT_SCALE

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> logits of the map, about +-1 for a well-trained model."""
        return self.decoder(latent / LATENT_SCALE)

    def forward(self, pm1_map: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(pm1_map))
