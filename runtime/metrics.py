"""Pixel agreement of a mask with a ground truth: in the runtime so that `localize --truth` and `eval` share it."""

from __future__ import annotations

import numpy as np


def pixel_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 of two boolean maps at the image's resolution; 0 when the truth is empty.

    The paper's metric (DiffIML sec. 4.2) as IMDLBenCo's ``PixelF1`` computes it per image: an authentic image (empty
    truth) has no true positives, so it scores 0 whatever is predicted.
    """
    tp = float(np.count_nonzero(pred & truth))
    denom = float(np.count_nonzero(pred) + np.count_nonzero(truth))
    return 0.0 if denom == 0 or not truth.any() else 2.0 * tp / denom


def map_agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float]:
    """(mask agreement, max |Δp|) of two lists of probability maps: the fraction of all pixels, over all maps, whose
    decision (p >= 0.5) is the same, and the largest probability difference. How a precision or a device backend is
    held against fp32 on the CPU."""
    agree = sum(int(((a >= 0.5) == (b >= 0.5)).sum()) for a, b in zip(reference, candidate, strict=True))
    total = sum(a.size for a in reference)
    worst = max((float(np.abs(a - b).max()) for a, b in zip(reference, candidate, strict=True)), default=0.0)
    return (agree / total if total else 1.0), worst


def pixel_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean maps; 0 when both are empty (IMDLBenCo's ``PixelIOU``)."""
    union = float(np.count_nonzero(pred | truth))
    return 0.0 if union == 0 else float(np.count_nonzero(pred & truth)) / union
