"""``diffiml eval``: localize every image of a dataset with a bundle and score it at the image's original size."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from diffiml.benchmarks.groups import group_rows, manipulation_type, set_names
from diffiml.benchmarks.metrics import auc, pixel_f1, pixel_iou, summarize
from diffiml.runtime.image_io import load_image, to_rgb8
from diffiml.runtime.localizer import Localizer
from diffiml.train.data.readers import read_mask

if TYPE_CHECKING:
    from diffiml.benchmarks.baseline import BaselinePredictor

log = logging.getLogger(__name__)


def read_truth(path: Path | None, height: int, width: int) -> np.ndarray:
    """Boolean truth at (height, width); masks binarized at half their range; None means authentic."""
    if path is None:
        return np.zeros((height, width), bool)
    truth = read_mask(path) > 0
    if truth.shape != (height, width):
        raise ValueError(f"{path}: mask size {truth.shape[::-1]} differs from image size {(width, height)}")
    return truth


def evaluate(localizer: Localizer | BaselinePredictor, samples: list, name: str,
             perturb: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[dict, list[dict]]:
    """samples: ``diffiml.train.data.readers.Sample`` rows (authentic ones: mask None). ``perturb`` degrades each
    image first (robustness). Rows carry the image-level decision, whether the mask marks anything, and the
    detector's evidence (what ``diffiml fit-detector`` fits on).
    ``localizer``: a bundle's Localizer or the Table 5 baseline; both give ``probability`` and ``score``.
    The summary holds ``groups``: the same figures per manipulation type and per set (``benchmarks/groups.py``)."""
    rows = []
    sets = set_names([Path(s.image) for s in samples])
    for sample, set_name in tqdm(list(zip(samples, sets, strict=True)), desc=f"eval {name}", unit="img",
                                 leave=False):
        try:
            decoded = load_image(sample.image)
            rgb = decoded.rgb if perturb is None else to_rgb8(perturb(decoded.rgb))
            truth = read_truth(sample.mask, rgb.shape[0], rgb.shape[1])
        except ValueError as exc:
            log.warning("skipped: %s", exc)
            continue
        result = localizer.localize(rgb)
        prob = result.probability
        pred = result.mask  # empty where the decision says authentic, if the Localizer follows it
        rows.append({
            "image": str(sample.image), "manipulated": bool(truth.any()), "score": result.score,
            "decision": result.decision, "marked": bool(pred.any()), "marked_fraction": float(pred.mean()),
            "set": set_name, "type": manipulation_type(Path(sample.image), getattr(sample, "type", None)),
            "f1": pixel_f1(pred, truth), "iou": pixel_iou(pred, truth),
            "auc": auc(prob, truth) if truth.any() else float("nan"),
            "f1_trivial": pixel_f1(np.ones_like(truth), truth),
            "members": getattr(result, "members", 0),
            "evidence": result.evidence,
        })
    summary = summarize(rows, name)
    summary["groups"] = [summarize(group, group_name) for group_name, group in group_rows(rows).items()]
    return summary, rows
