"""Self-correlation: what lets the condition encoder see copy-moves.

A region copied within one photo carries the camera's noise, JPEG history and lighting of its surroundings, so the
per-position traces that expose a splice are absent; what exposes it is that two regions of the image *match each
other*. This stage compares every position of a grid with every other (BusterNet's similarity branch, CMSeg-Net's
self-correlation) and hands the head what the matches look like.

Choices (measured without training on real-dev copy-moves, ``COPYMOVE.md``, and chosen to export as plain ONNX):

- **Grid**: the 1/16 grid (16 × 16 = 256 positions at 256²), not the 1/8 latent grid. At 1/8 the HW × HW matrix
  has a million entries and its TopK and masking alone took 70 % of the whole encoder's time on a 2-core CPU
  (``diffiml bench correlation``); at 1/16 it has 65 536 and the stage costs a few per cent. Stride 16 was also
  among the better choices for matching in ``COPYMOVE.md`` (stride 8 alone the weakest). The stage's output is
  upsampled to the latent grid, where the head's finer stages give the edges.
- **Features**: the stride-16 stage concatenated with the stride-8 stage average-pooled to 1/16 (its finer detail
  in a coarser cell). **Centred** on the image's mean feature before L2 normalisation: otherwise what every
  position shares (sky, texture) dominates the similarity.
- **Own neighbourhood excluded**: positions within ``exclude`` cells (Chebyshev distance) of each other cannot
  match, so a patch does not find itself or its smooth surroundings. A constant boolean matrix of the grid.
- **Top-k sorted similarities** (BusterNet): the best ``k`` matches of each position, a signature of "this patch
  exists elsewhere" that does not depend on where.
- **Offset of the matches** (dy, dx divided by the grid size): raw similarity over-predicts on self-similar
  texture; a copied region is told apart by the *coherence* of its match field (neighbours map to the partner's
  neighbours). The offsets give the conv block the geometry to test that, which top-k values alone lack. They are
  the top-k offsets averaged with softmax(similarity / ``temperature``) weights rather than the single best match's:
  an argmax jumps between near-equal matches (flat regions), so two backends whose similarities differ in the last
  bit could disagree by a whole image width; the weighted mean moves only as much as the similarities do.
- A small conv block (3×3, BN, ReLU, twice) turns these ``k + 2`` channels into ``channels`` features at the grid;
  the encoder adds them through a zero-initialised projection, so a model warm-started from one trained without
  this stage starts exactly where that model was and learns only what the stage adds.

Cost: one (HW × C) · (C × HW) matrix product and a TopK over HW per position; it runs once per image, inside the
encoder graph (MatMul, Where, TopK, Div, Mod: standard ONNX on onnxruntime and TensorRT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def neighbourhood(grid: int, exclude: int) -> torch.Tensor:
    """(grid², grid²) bool: True where two positions lie within ``exclude`` cells of each other."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near_y = (ys[:, None] - ys[None, :]).abs() <= exclude
    near_x = (xs[:, None] - xs[None, :]).abs() <= exclude
    return near_y & near_x


class SelfCorrelation(nn.Module):
    """Backbone features at the latent grid (B, C, g, g) -> match features (B, channels, g, g)."""

    def __init__(self, grid: int, topk: int = 16, exclude: int = 2, channels: int = 32,
                 temperature: float = 0.05) -> None:
        super().__init__()
        if topk >= grid * grid - (2 * exclude + 1) ** 2:
            raise ValueError(f"top-{topk} needs more positions than a {grid}x{grid} grid leaves outside the band")
        self.grid, self.topk, self.temperature = grid, topk, temperature
        self.register_buffer("near", neighbourhood(grid, exclude), persistent=False)
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        self.register_buffer("coords", coords, persistent=False)  # (2, g²): each position's own (y, x)
        self.block = nn.Sequential(
            nn.Conv2d(topk + 2, channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) -> (B, g², g²) cosine similarity of centred features, own neighbourhood at -2."""
        f = features.flatten(2)
        f = f - f.mean(dim=2, keepdim=True)
        f = F.normalize(f, dim=1, eps=1e-6)
        sim = torch.matmul(f.transpose(1, 2), f)
        return sim.masked_fill(self.near, -2.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        g = self.grid
        values, indices = torch.topk(self.similarity(features), self.topk, dim=2, sorted=True)
        # (B, 2, g², k): the (y, x) of each match, then its offset from the position itself
        partner = torch.stack([torch.div(indices, g, rounding_mode="floor"), indices % g], dim=1)
        offset = (partner - self.coords[None, :, :, None]).to(values.dtype) / g
        weights = torch.softmax(values / self.temperature, dim=2)  # (B, g², k)
        offsets = (offset * weights[:, None]).sum(dim=3)  # (B, 2, g²)
        matches = torch.cat([values.transpose(1, 2), offsets], dim=1).reshape(-1, self.topk + 2, g, g)
        return self.block(matches)
