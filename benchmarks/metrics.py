"""Pixel- and image-level metrics of image manipulation localization, per image, as the field reports them.

- Pixel F1 at the fixed threshold 0.5, computed per image and averaged over the manipulated images: the paper's
  metric (DiffIML sec. 4.2) and IMDLBenCo's ``PixelF1`` in its default "origin" mode.
- ``f1_with_authentic``: IMDLBenCo's variant that also averages in authentic images, each scoring F1 = 0 (an empty
  ground truth has no true positives), as some papers report.
- Pixel AUC (per image, manipulated images only) and IoU at 0.5, as in IMDLBenCo's ``PixelAUC`` / ``PixelIOU``.
- Image-level AUC of the image score against manipulated vs authentic (IMDLBenCo ``ImageAUC``).
- False alarms: on authentic images, the share whose mask marks anything and the marked area; the image-level
  decision's balanced accuracy at the bundle's threshold.
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
        **false_alarms(per_image),
    }


def false_alarms(per_image: list[dict]) -> dict:
    """What a user of a mostly authentic collection sees: the share of authentic images whose mask marks any pixel
    and the area it marks; the image-level decision's detection rate (manipulated judged manipulated), false-alarm
    rate (authentic judged manipulated) and balanced accuracy (their mean with the true-negative rate). NaN where a
    class is absent or the rows carry no decision."""
    nan = float("nan")
    authentic = [r for r in per_image if not r["manipulated"]]
    manip = [r for r in per_image if r["manipulated"]]
    out = {"n_authentic": len(authentic),
           "authentic_marked_share": float(np.mean([r.get("marked", False) for r in authentic])) if authentic else nan,
           "authentic_marked_area": float(np.mean([r.get("marked_fraction", 0.0) for r in authentic]))
           if authentic else nan}
    decided = all(r.get("decision") is not None for r in per_image) and per_image
    tpr = float(np.mean([r["decision"] for r in manip])) if decided and manip else nan
    fpr = float(np.mean([r["decision"] for r in authentic])) if decided and authentic else nan
    return {**out, "detection_rate": tpr, "false_alarm_rate": fpr, "balanced_accuracy": (tpr + 1 - fpr) / 2}
