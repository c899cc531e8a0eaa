"""The PyTorch reference pipeline behind the runtime's interface (``diffiml localize --reference``): same
decoding, preprocessing, noise and post-processing as ``Localizer``, with the sampler of ``diffiml.train`` in
place of the engines, so a user can compare the two on their own images."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from diffiml.export.exporter import load_diffiml
from diffiml.runtime.bundle import load_bundle, sha256_of
from diffiml.runtime.errors import BundleError
from diffiml.runtime.localizer import Localizer
from diffiml.train.sampler import sample


class ReferenceLocalizer(Localizer):
    @staticmethod
    def open(bundle_dir: str | Path, checkpoint: str | Path | None = None, steps: int | None = None,  # type: ignore[override]
             ensemble: int | None = None, tta: bool = False, seed: int = 0, uncertainty: bool = False
             ) -> ReferenceLocalizer:
        """``checkpoint`` defaults to the one the bundle was exported from (its sha256 is checked)."""
        bundle = load_bundle(bundle_dir, verify=False)
        if checkpoint is None:
            checkpoint = bundle.checkpoint_path()
            weights = Path(checkpoint) / "model.safetensors"
            if not weights.is_file() or sha256_of(weights) != bundle.manifest["checkpoint"]["sha256"]:
                raise BundleError(f"{weights}: missing or not the checkpoint this bundle was exported from")
        model, _ = load_diffiml(checkpoint)
        loc = ReferenceLocalizer(bundle, {}, None, "torch-reference", steps or bundle.default_steps,
                                 ensemble or bundle.default_ensemble, tta, seed, uncertainty)
        loc.model = model
        return loc

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        t0 = time.perf_counter()
        with self._lock:
            out = sample(self.model, torch.from_numpy(x), self.steps, self.ensemble, self.seed, self.tta,
                         members=self.uncertainty)
        prob = out.probability[:, 0].numpy()
        unc = None
        if out.member_probability is not None:
            passes = out.member_probability.numpy().reshape(x.shape[0], -1, self.ensemble, *prob.shape[1:])
            unc = passes.std(axis=2).max(axis=1)
        return prob, unc, {"reference": time.perf_counter() - t0}


class BaselineLocalizer(Localizer):
    """The discriminative baseline (Table 5) behind the runtime's interface, so ``diffiml eval`` scores both
    models with the same reading, resizing and metrics."""

    def __init__(self, checkpoint: str | Path) -> None:  # noqa: D107 - no engines, no noise: a plain forward
        from types import SimpleNamespace

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
        self.bundle = SimpleNamespace(image_size=model_config.image_size, mean=list(IMAGE_MEAN),  # type: ignore
                                      std=list(IMAGE_STD))
        self.backend, self.tta, self.uncertainty = "torch-baseline", False, False
        self._lock = threading.Lock()

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            prob = torch.sigmoid(self.model(torch.from_numpy(x)))[:, 0].numpy()
        return prob, None, {"reference": time.perf_counter() - t0}
