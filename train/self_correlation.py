"""Self-correlation: what lets the condition encoder see copy-moves.

A region copied within one photo carries the camera's noise, JPEG history and lighting of its surroundings, so the
per-position traces that expose a splice are absent; what exposes it is that two regions of the image *match each
other*. This stage compares every position of a grid with every other (BusterNet's similarity branch, CMSeg-Net's
self-correlation) and hands the head what the matches look like.

Choices (measured without training on real-dev copy-moves, ``COPYMOVE.md``, and chosen to export as plain ONNX):

- **Grids**: every position of the 1/8 latent grid (the *queries*, 32 × 32 at 256²) is compared with every
  position of the 1/16 grid (the *keys*, 16 × 16). Queries at 1/8 keep small copies visible (real copy-moves often
  cover 1-5 % of the image); keys at 1/16 keep the matrix at 1024 × 256. With keys at 1/8 too, the HW × HW matrix
  has a million entries and its TopK and masking took 70 % of the whole encoder's time on a 2-core CPU
  (a one-off ``diffiml bench correlation`` of that first design, commit bd08372); stride 16 was also among the
  better choices for matching in ``COPYMOVE.md``.
- **Features**: queries are the stride-8 stage beside the stride-16 stage upsampled to 1/8; keys the stride-16
  stage beside the stride-8 stage average-pooled to 1/16 (the same 128 channels, each at its grid). Each is
  **centred** on the image's mean feature before L2 normalisation: otherwise what every position shares (sky,
  texture) dominates the similarity.
- **Own neighbourhood excluded**: a key within ``exclude`` cells of the 1/16 grid (Chebyshev distance) of the
  key cell that holds the query cannot match it, so a patch does not find itself or its smooth surroundings. A
  constant added to the similarity (-3 in the band, 0 elsewhere).
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

Cost: one (Q × C) · (C × K) matrix product and a TopK over K per query; it runs once per image, inside the
encoder graph (MatMul, Where, TopK, Div, Mod: standard ONNX on onnxruntime and TensorRT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def neighbourhood(grid: int, exclude: int, query_grid: int | None = None) -> torch.Tensor:
    """(query_grid², grid²) bool: True where the key cell lies within ``exclude`` cells of the key cell that holds
    the query (``query_grid`` a multiple of ``grid``; default equal)."""
    q = query_grid or grid
    ratio = q // grid
    ky, kx = (t.flatten() for t in torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    qy, qx = (torch.div(t.flatten(), ratio, rounding_mode="floor")
              for t in torch.meshgrid(torch.arange(q), torch.arange(q), indexing="ij"))
    return ((qy[:, None] - ky[None, :]).abs() <= exclude) & ((qx[:, None] - kx[None, :]).abs() <= exclude)


def _centred_unit(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, hw): minus the image's mean feature, then unit length per position."""
    f = features.flatten(2)
    return F.normalize(f - f.mean(dim=2, keepdim=True), dim=1, eps=1e-6)


class SelfCorrelation(nn.Module):
    """Query features (B, C, q, q) and key features (B, C, g, g) of one image -> match features (B, channels, q, q).
    Without ``query_grid`` the queries are the keys (one grid)."""

    def __init__(self, grid: int, topk: int = 16, exclude: int = 1, channels: int = 32,
                 temperature: float = 0.05, query_grid: int | None = None) -> None:
        super().__init__()
        q = query_grid or grid
        if q % grid:
            raise ValueError(f"the query grid {q} must be a multiple of the key grid {grid}")
        if topk >= grid * grid - (2 * exclude + 1) ** 2:
            raise ValueError(f"top-{topk} needs more positions than a {grid}x{grid} grid leaves outside the band")
        self.grid, self.query_grid, self.topk, self.temperature = grid, q, topk, temperature
        # Added to the similarity rather than masked in (Where): an Add of a constant is vectorised and threaded in
        # onnxruntime, a Where over the matrix was a sixth of the stage's time. -3 puts any cosine below -1.
        self.register_buffer("exclusion", neighbourhood(grid, exclude, q).float() * -3.0, persistent=False)
        # each query's own position in key-grid units (cell centres), for the offsets of its matches
        centres = (torch.arange(q, dtype=torch.float32) + 0.5) * grid / q - 0.5
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("coords", torch.stack([cy.flatten(), cx.flatten()]), persistent=False)  # (2, q²)
        self.block = nn.Sequential(
            nn.Conv2d(topk + 2, channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, q², g²) cosine similarity of centred features, each query's own neighbourhood below -1."""
        q = _centred_unit(queries)
        k = q if keys is None else _centred_unit(keys)
        return torch.matmul(q.transpose(1, 2), k) + self.exclusion

    def forward(self, queries: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        g, q = self.grid, self.query_grid
        values, indices = torch.topk(self.similarity(queries, keys), self.topk, dim=2, sorted=True)
        # (B, 2, q², k): the (y, x) of each match on the key grid, then its offset from the query itself
        partner = torch.stack([torch.div(indices, g, rounding_mode="floor"), indices % g], dim=1)
        offset = (partner.to(values.dtype) - self.coords[None, :, :, None]) / g
        weights = torch.softmax(values / self.temperature, dim=2)  # (B, q², k)
        offsets = (offset * weights[:, None]).sum(dim=3)  # (B, 2, q²)
        matches = torch.cat([values.transpose(1, 2), offsets], dim=1).reshape(-1, self.topk + 2, q, q)
        return self.block(matches)
