"""Parameters and multiply-accumulates per component (``diffiml info``), counted with
``torch.utils.flop_counter.FlopCounterMode`` at batch 1 with eager attention (so attention matmuls are seen).

The paper's "FLOPs" are MACs with *one* UNet evaluation per ensemble member (Table 4: +12.34 G per member);
``*_executed`` counts what the sampler really runs: every one of the K steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffiml.constants import LATENT_CHANNELS
from diffiml.train.config import ModelConfig
from diffiml.train.model import DiffIML


def gmacs(fn: Any) -> tuple[float, float]:
    """(all GMACs, GMACs of attention). Attention runs as batched matmuls here (the UNet's under the math backend,
    the encoder's as written); fvcore, the paper's counter, did not see the UNet's, which the authors run fused."""
    # The math backend runs attention as bmm, which the counter sees (CPU flash attention is not in its table).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    attention = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(k))
    return counter.get_total_flops() / 2 / 1e9, attention / 2 / 1e9


def _params_m(*modules: torch.nn.Module) -> float:
    return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


def model_info(config: ModelConfig) -> dict[str, Any]:
    model = DiffIML(config).eval()
    s, h = config.image_size, config.latent_size
    image = torch.zeros(1, 3, s, s)
    cond = model.encoder(image)
    cond_feat = model.unet.condition_features(cond)
    z = torch.zeros(1, 2 * LATENT_CHANNELS, h, h)
    t = torch.zeros(1, dtype=torch.int64)
    encoder, _ = gmacs(lambda: model.unet.condition_features(model.encoder(image)))
    unet, unet_attention = gmacs(lambda: model.unet(z, t, cond_feat))
    decoder, _ = gmacs(lambda: model.vae.decode(z[:, :LATENT_CHANNELS]))
    unet_fvcore = unet - unet_attention
    k = config.steps
    return {
        "config": config.name,
        "image_size": s,
        "params_m": round(_params_m(model.encoder, model.unet), 3),  # trainable, as the paper counts
        "params_m_total": round(_params_m(model), 3),
        "params_m_by_part": {
            "encoder": round(_params_m(model.encoder), 3),
            "unet": round(_params_m(model.unet), 3),
            "lightvae": round(_params_m(model.vae), 3),
        },
        "gmacs_by_part": {
            "encoder": round(encoder, 3),
            "unet_call": round(unet, 3),
            "unet_call_attention": round(unet_attention, 3),
            "decoder": round(decoder, 3),
        },
        "steps": k,
        "gmacs_n1": round(encoder + unet + decoder, 2),
        "gmacs_n5": round(encoder + 5 * unet + decoder, 2),
        "gmacs_n1_executed": round(encoder + k * unet + decoder, 2),
        "gmacs_n5_executed": round(encoder + 5 * k * unet + decoder, 2),
        # The paper's counter (fvcore) without the UNet's fused attention, for a like-for-like comparison.
        "gmacs_n1_unet_attention_uncounted": round(encoder + unet_fvcore + decoder, 2),
        "gmacs_n5_unet_attention_uncounted": round(encoder + 5 * unet_fvcore + decoder, 2),
    }
