"""Pixel- and image-level metrics of image manipulation localization, per image, as the field reports them.

- Pixel F1 at the fixed threshold 0.5, computed per image and averaged over the manipulated images: the paper's
  metric (DiffIML sec. 4.2) and IMDLBenCo's ``PixelF1`` in its default "origin" mode.
- ``f1_with_authentic``: IMDLBenCo's variant that also averages in authentic images, each scoring F1 = 0 (an empty
  ground truth has no true positives), as some papers report.
- Pixel AUC (per image, manipulated images only) and IoU at 0.5, as in IMDLBenCo's ``PixelAUC`` / ``PixelIOU``.
- Image-level AUC of the image score against manipulated vs authentic (IMDLBenCo ``ImageAUC``).
"""

from __future__ import annotations

import numpy as np

from diffiml.runtime.metrics import pixel_f1, pixel_iou

__all__ = ["auc", "pixel_f1", "pixel_iou", "summarize"]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties averaged; NaN with a single class."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(per_image: list[dict], name: str) -> dict:
    """per_image rows: {f1, iou, auc, score, manipulated(bool)} -> the dataset's row of the report."""
    manip = [r for r in per_image if r["manipulated"]]
    mean = lambda key, rows: float(np.nanmean([r[key] for r in rows])) if rows else float("nan")  # noqa: E731
    return {
        "name": name,
        "n": len(per_image),
        "n_manipulated": len(manip),
        "f1": mean("f1", manip),
        "f1_with_authentic": mean("f1", per_image),
        "auc": mean("auc", manip),
        "iou": mean("iou", manip),
        "image_auc": auc(np.array([r["score"] for r in per_image]), np.array([r["manipulated"] for r in per_image])),
        "f1_all_manipulated_mask": mean("f1_trivial", manip),
        "mean_members": mean("members", per_image) if per_image and "members" in per_image[0] else float("nan"),
    }
