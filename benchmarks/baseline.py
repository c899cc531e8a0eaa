"""The discriminative baseline of Table 5 (the same condition encoder, a 1x1 head, BCE + Dice) as a predictor that
``diffiml eval`` scores with the same image reading, resizing and metrics as a bundle. It is a benchmark of the
paper's claim, not a product: it has no bundle and runs in PyTorch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from diffiml.runtime.errors import BundleError
from diffiml.runtime.image_io import preprocess
from diffiml.runtime.localizer import LocalizationResult, image_score


class BaselinePredictor:
    backend = "torch-baseline"

    def __init__(self, checkpoint: str | Path) -> None:
        from diffiml.constants import IMAGE_MEAN, IMAGE_STD
        from diffiml.train.checkpoint import load_config, load_weights
        from diffiml.train.config import ModelConfig
        from diffiml.train.model import DiscriminativeBaseline

        config = load_config(checkpoint)
        if config.get("kind") != "baseline":
            raise BundleError(f"{checkpoint}: not a baseline checkpoint (kind {config.get('kind')!r})")
        model_config = ModelConfig.from_json(config["model"])
        self.model = DiscriminativeBaseline(model_config).eval()
        load_weights(checkpoint, self.model)
        self.size, self.mean, self.std = model_config.image_size, list(IMAGE_MEAN), list(IMAGE_STD)
        self._lock = threading.Lock()

    def localize(self, rgb: np.ndarray) -> LocalizationResult:
        """(H, W, 3) uint8 RGB -> the runtime's result type: maps at (H, W) on access, the same image score."""
        import torch

        x = preprocess([rgb], self.size, self.mean, self.std)
        with self._lock, torch.no_grad():
            prob = torch.sigmoid(self.model(torch.from_numpy(x)))[0, 0].numpy()
        return LocalizationResult(prob, None, rgb.shape[0], rgb.shape[1], image_score(prob))
