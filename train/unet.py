"""The denoising UNet: one resolution level at the latent grid (paper 3.2, "a simplified U-Net").

Structure after the authors' diffusers-style UNet2DModel (block_out_channels=[C], no downsampling): conv_in,
a down block of ``layers`` residual blocks, a mid block (residual, self-attention, residual), an up block of
``layers + 1`` residual blocks fed by the skips, GroupNorm/SiLU/conv_out. 8 channels in and out (4 mask + 4 edge).

The condition enters once, after conv_in: ``conv3x3(concat(h, cond))``. That conv is split into a latent part and
a condition part (the same linear map), so ``condition_features(cond)`` can be computed once per image and reused
at every step and for every ensemble member.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffiml.train.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cos first (diffusers: flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention over (B, S, C) tokens in ``heads`` heads -> (B, S, C), by the fused kernel.

    At 512² the latent grid has 4096 tokens: materializing 16 × 4096² scores per member (1 GiB in fp32) made the
    explicit softmax(QKᵀ)V several times slower on CPU than ``scaled_dot_product_attention``."""
    b, s, c = q.shape
    split = lambda t: t.reshape(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, s, c)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the latent grid (diffusers' mid-block attention, 8-wide heads).

    ``attention`` is the (q, k, v, heads) -> out function: export swaps in one that writes onnxruntime's fused
    operator (``diffiml.export.attention``)."""

    def __init__(self, channels: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.attention = multi_head_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        y = self.attention(q, k, v, self.heads)
        return x + self.out(y).transpose(1, 2).reshape(b, c, h, w)


class DenoisingUNet(nn.Module):
    """Predicts the clean latents z0 from noisy latents (B, 8, h, w), timesteps (B,) and condition features."""

    def __init__(self, config: ModelConfig, latent_channels: int = 8) -> None:
        super().__init__()
        c, g, tdim = config.unet_channels, config.unet_groups, config.time_embed_dim
        self.freq_dim = c
        self.time_mlp = nn.Sequential(nn.Linear(c, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        # conv3x3(concat(h, cond)) split into its two halves (no bias, as in the authors' code).
        self.latent_entry = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.condition_entry = nn.Conv2d(config.head_channels, c, 3, padding=1, bias=False)
        layers = config.unet_layers_per_block
        self.down = nn.ModuleList(ResBlock(c, c, tdim, g) for _ in range(layers))
        self.mid1 = ResBlock(c, c, tdim, g)
        self.mid_attn = SelfAttention(c, config.unet_head_dim, g)
        self.mid2 = ResBlock(c, c, tdim, g)
        self.up = nn.ModuleList(ResBlock(2 * c, c, tdim, g) for _ in range(layers + 1))
        self.norm_out = nn.GroupNorm(g, c, eps=1e-5)
        self.conv_out = nn.Conv2d(c, latent_channels, 3, padding=1)

    def condition_features(self, condition: torch.Tensor) -> torch.Tensor:
        """The part of the UNet that depends on the condition alone: run once per image."""
        return self.condition_entry(condition)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond_features: torch.Tensor) -> torch.Tensor:
        """z_t: (B·N, 8, h, w), image-major (the N ensemble members of image 0 first); t: (B·N,) or (1,)
        timesteps in [0, T); cond_features: (B, C, h, w), one per image, broadcast over its N members here
        rather than copied N times by the caller -> z0_hat (B·N, 8, h, w)."""
        temb = self.time_mlp(timestep_embedding(t, self.freq_dim).to(z_t.dtype))  # fp32 angles, model dtype out
        h = self.latent_entry(self.conv_in(z_t))
        h = (h.unflatten(0, (cond_features.shape[0], -1)) + cond_features[:, None]).flatten(0, 1)
        skips = [h]
        for block in self.down:
            h = block(h, temb)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
