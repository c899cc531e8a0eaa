"""The three graphs of an engine bundle, each described once: its wrapper module, its input/output names with
symbolic batch dimensions, sample inputs, and TensorRT optimization profiles. Export, the parity checks and the
TensorRT builder all read these descriptions; the runtime reads what export wrote of them into the manifest.

The wrappers are deployment shapes of the training modules (after segment-anything's ``SamOnnxModel``): the
condition-only part of the UNet is folded into the encoder graph, and the DDIM update into the UNet graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffiml.constants import LATENT_CHANNELS
from diffiml.train.ddim import ddim_update
from diffiml.train.model import DiffIML


class ConditionEncoderGraph(nn.Module):
    """image (B, 3, S, S), normalized -> cond_features (B, C, h, w): all the work that depends on the image alone."""

    def __init__(self, model: DiffIML) -> None:
        super().__init__()
        self.encoder, self.unet = model.encoder, model.unet

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet.condition_features(self.encoder(image))


class UNetStepGraph(nn.Module):
    """One DDIM step (eta = 0): latents (B·N, 8, h, w), cond_features (B, C, h, w), timestep, coef_x0, coef_xt,
    sqrt_alpha (each (1,)) -> next latents (B·N, 8, h, w). The runtime's loop is then engine calls only.
    The update is ``diffiml.train.ddim.ddim_update``."""

    def __init__(self, model: DiffIML) -> None:
        super().__init__()
        self.unet = model.unet

    def forward(self, latents: torch.Tensor, cond_features: torch.Tensor, timestep: torch.Tensor,
                coef_x0: torch.Tensor, coef_xt: torch.Tensor, sqrt_alpha: torch.Tensor) -> torch.Tensor:
        z0 = self.unet(latents, timestep, cond_features)
        return ddim_update(latents, z0, coef_x0, coef_xt, sqrt_alpha)


class MaskDecoderGraph(nn.Module):
    """latents (B, 8, h, w) (averaged, or per member) -> mask probability (B, 1, S, S)."""

    def __init__(self, model: DiffIML) -> None:
        super().__init__()
        self.vae = model.vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.vae.decode(latents[:, :LATENT_CHANNELS]))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a symbolic (dynamic) dimension
    dtype: str = "float32"

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    name: str  # also the file stem: NAME.onnx
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def sample_inputs(self, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.inputs:
            shape = spec.concrete(sizes)
            if spec.name == "timestep":
                out[spec.name] = torch.randint(0, 1000, shape, generator=g).float()
            elif spec.name in ("coef_x0", "coef_xt", "sqrt_alpha"):
                out[spec.name] = torch.rand(shape, generator=g)
            else:
                out[spec.name] = torch.randn(shape, generator=g)
        return out


def graph_specs(model: DiffIML) -> dict[str, tuple[GraphSpec, nn.Module]]:
    """The three graphs of ``model``. Wrappers come back in eval mode: the exporter restores a module's mode after
    tracing, recursively, so a wrapper left in train mode would switch the model's BatchNorms to batch statistics."""
    specs = _graph_specs(model)
    for _, module in specs.values():
        module.eval()
    return specs


def _graph_specs(model: DiffIML) -> dict[str, tuple[GraphSpec, nn.Module]]:
    cfg = model.config
    s, h, c = cfg.image_size, cfg.latent_size, cfg.unet_channels
    z = 2 * LATENT_CHANNELS
    return {
        "condition_encoder": (
            GraphSpec("condition_encoder", (TensorSpec("image", ("images", 3, s, s)),),
                      (TensorSpec("cond_features", ("images", c, h, h)),)),
            ConditionEncoderGraph(model),
        ),
        "unet": (
            GraphSpec("unet", (
                TensorSpec("latents", ("members", z, h, h)),
                TensorSpec("cond_features", ("images", c, h, h)),
                TensorSpec("timestep", (1,)),
                TensorSpec("coef_x0", (1,)),
                TensorSpec("coef_xt", (1,)),
                TensorSpec("sqrt_alpha", (1,)),
            ), (TensorSpec("next_latents", ("members", z, h, h)),)),
            UNetStepGraph(model),
        ),
        "mask_decoder": (
            GraphSpec("mask_decoder", (TensorSpec("latents", ("latents", z, h, h)),),
                      (TensorSpec("probability", ("latents", 1, s, s)),)),
            MaskDecoderGraph(model),
        ),
    }
