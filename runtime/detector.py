"""The image-level decision: how likely is this image manipulated, calibrated, and is it past the bundle's threshold?

Why not the map's top pixels: the model marks some region in most untouched photos, and the copy-move cue, fused by
a max, pinned any image with a repeated structure to 1.0. A forensic user triaging a mostly authentic collection
needs a score that ranks and a decision with a known false-alarm rate. As TruFor pools its localization map with a
reliability map, this head pools what DiffIML already computes: the statistics of the model's map, the ensemble's
disagreement on the latent (a score-based model's own confidence), the encoder's pooled features, and what the
copy-move cue found (including how well the matched regions' noise residuals agree, which tells a copy from a natural
repetition). A logistic model over standardized evidence, then Platt calibration on a held-out split of photos
(``diffiml fit-detector``); the threshold is set for a target false-alarm rate on that split's authentic images.

Torch-free and cheap (numpy on a few hundred numbers per image); the manifest carries it (``detector``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from diffiml.runtime.errors import BundleError

METHOD = "logistic-platt"
DETECTOR_FILE = "detector.json"  # beside a checkpoint: what `diffiml fit-detector` writes and `diffiml export` reads
TOP_FRACTION = 0.005  # the old score: mean of the top 0.5 % of the model's pixel probabilities


def map_evidence(probability: np.ndarray) -> dict[str, float]:
    """Statistics of the model's own map (S, S) in [0, 1], before any cue is fused."""
    p = probability.ravel()
    k = max(1, int(p.size * TOP_FRACTION))
    marked = (probability >= 0.5).astype(np.uint8)
    largest = 0.0
    if marked.any():
        count, _, stats, _ = cv2.connectedComponentsWithStats(marked, connectivity=8)
        largest = float(stats[1:, cv2.CC_STAT_AREA].max()) / p.size if count > 1 else 0.0
    return {"map_top": float(np.partition(p, p.size - k)[-k:].mean()), "map_max": float(p.max()),
            "map_mean": float(p.mean()), "map_area": float(marked.mean()), "map_largest": largest}


def spread_evidence(spread: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """The ensemble's disagreement: ``spread`` (h, w) is the members' standard deviation of the final mask latent
    (mean over its channels); where the averaged map marks pixels, a confident model agrees with itself."""
    h, w = spread.shape
    small = cv2.resize(probability, (w, h), interpolation=cv2.INTER_AREA)
    marked = small >= 0.5
    return {"spread_mean": float(spread.mean()),
            "spread_marked": float(spread[marked].mean()) if marked.any() else 0.0}


def encoder_evidence(pooled: np.ndarray) -> dict[str, float]:
    """The condition encoder's features pooled over the image: ``pooled`` = (mean over positions, max over positions),
    2C values; what the image looks like as a whole, beyond the map."""
    half = pooled.size // 2
    return {**{f"cond_mean_{i}": float(v) for i, v in enumerate(pooled[:half])},
            **{f"cond_max_{i}": float(v) for i, v in enumerate(pooled[half:])}}


# The copy-move cue's inputs when it did not run (``--no-copy-move``, a bundle without a cue): a cue that found
# nothing. What it found otherwise: ``CopyMoveFinding.evidence`` (runtime/copy_move.py).
CUE_SILENT = {"cue_area": 0.0, "cue_transforms": 0.0, "cue_residual": 0.0, "cue_exact": 0.0, "cue_pairs": 0.0}


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0))))


@dataclass(frozen=True)
class Detector:
    """A logistic model over named evidence, Platt-calibrated, with a decision threshold on the calibrated
    probability chosen for ``target_false_alarm_rate`` on held-out authentic images."""

    names: tuple[str, ...]
    mean: np.ndarray  # (F,) standardization
    scale: np.ndarray  # (F,)
    weights: np.ndarray  # (F,)
    bias: float
    platt_a: float  # calibrated probability = sigmoid(platt_a * logit + platt_b)
    platt_b: float
    threshold: float
    target_false_alarm_rate: float
    record: dict[str, Any]  # how it was fitted (informational)

    def logit(self, evidence: dict[str, float]) -> float:
        missing = [n for n in self.names if n not in evidence]
        if missing:
            raise BundleError(f"the detector needs evidence this run did not compute: {missing[:4]}")
        x = np.array([evidence[n] for n in self.names], np.float64)
        return float(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def probability(self, evidence: dict[str, float]) -> float:
        """Calibrated probability that the image is manipulated."""
        return _sigmoid(self.platt_a * self.logit(evidence) + self.platt_b)

    def manifest(self) -> dict[str, Any]:
        return {"method": METHOD, "features": list(self.names), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "weights": self.weights.tolist(), "bias": self.bias,
                "platt": [self.platt_a, self.platt_b], "threshold": self.threshold,
                "target_false_alarm_rate": self.target_false_alarm_rate, "record": self.record}

    @staticmethod
    def from_manifest(entry: Any, where: str) -> Detector:
        """The manifest's ``detector``; anything malformed is a BundleError naming the key."""
        if not isinstance(entry, dict) or entry.get("method") != METHOD:
            raise BundleError(f"{where}: detector must be an object with method {METHOD!r}")
        try:
            names = tuple(str(n) for n in entry["features"])
            arrays = [np.asarray(entry[k], np.float64) for k in ("mean", "scale", "weights")]
            a, b = (float(v) for v in entry["platt"])
            bias, threshold = float(entry["bias"]), float(entry["threshold"])
            rate = float(entry["target_false_alarm_rate"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: detector entry is incomplete or not numeric ({exc})") from None
        if any(arr.shape != (len(names),) or not np.isfinite(arr).all() for arr in arrays) or not names:
            raise BundleError(f"{where}: detector mean, scale and weights need one finite number per feature")
        # a threshold just above 1 (a float's step) judges nothing manipulated
        if (arrays[1] <= 0).any() or not 0.0 <= threshold <= 1.0 + 1e-9 or not np.isfinite([a, b, bias]).all():
            raise BundleError(f"{where}: detector scale must be > 0, threshold in [0, 1], platt and bias finite")
        return Detector(names, arrays[0], arrays[1], arrays[2], bias, a, b, threshold, rate,
                        dict(entry.get("record", {})))
