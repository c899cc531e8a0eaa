"""Attention as onnxruntime's fused ``com.microsoft.MultiHeadAttention`` in the exported UNet.

Exported as plain ops, the UNet's attention is MatMul → Softmax → MatMul, and onnxruntime materializes every score:
at 512² that is 16 × 4096² floats (1 GiB) per ensemble member, and a step is slower and erratic against the fused
operator (``diffiml bench unet-call``), whose CPU kernel is a flash-attention loop and whose CUDA kernel is fused too.
TensorRT's parser does not read this operator (TensorRT fuses the plain pattern itself), so ``--attention standard``
keeps the plain ops for bundles meant for ``build-engines``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from diffiml.train.unet import SelfAttention, multi_head_attention

ATTENTION_MODES = ("fused", "standard")
FUSED_DOMAIN = "com.microsoft"


class _FusedMultiHeadAttention(torch.autograd.Function):
    """Computes like the training model; exports as one ``com.microsoft.MultiHeadAttention`` node.

    Its inputs are (B, S, C) query/key/value with ``num_heads``; its default scale is 1/sqrt(C / heads), the same as
    ``scaled_dot_product_attention``'s.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:  # noqa: ANN001
        return multi_head_attention(q, k, v, heads)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):  # noqa: ANN001, ANN205 - TorchScript graph values
        return g.op(f"{FUSED_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=heads)


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return _FusedMultiHeadAttention.apply(q, k, v, heads)


@contextmanager
def attention_for_export(module: nn.Module, mode: str) -> Iterator[None]:
    """Within the block, every SelfAttention under ``module`` exports as ``mode`` ("fused" or "standard")."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
    layers = [m for m in module.modules() if isinstance(m, SelfAttention)]
    saved = [m.attention for m in layers]
    if mode == "fused":
        for m in layers:
            m.attention = _fused
    try:
        yield
    finally:
        for m, fn in zip(layers, saved, strict=True):
            m.attention = fn
