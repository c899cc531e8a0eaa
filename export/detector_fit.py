"""``diffiml fit-detector``: the image-level detector (runtime/detector.py) fitted on ``diffiml eval --rows`` output.

Why from eval's rows: the evidence must be exactly what the runtime computes (the bundle's graphs, its cue, its
default ensemble and steps), and eval already runs the runtime over labelled lists. Fitting is then seconds of numpy.

Protocol: rows from synthetic forgeries and authentic images made from the training photos (the fitting part), and
rows from photos the model never saw, kept apart from the test photos (make-synthetic's ``calibration.json``: the
calibration part). Calibrating on the training photos underestimated the false-alarm rate on unseen photos by more
than half (4.7 % there, 12.9 % on the test photos): the model is quieter on photos it was trained on. Without
calibration rows, a share of the fitting rows' photos is held out instead (split by ``sources.json``).

On the fitting part, standardized L2-regularized logistic regression for each candidate feature set and strength,
compared by cross-validated log-loss (folds by photo); the best is refitted on the whole fitting part. Only then is the
calibration part used: Platt scaling (two parameters), and the decision threshold, the smallest calibrated
probability that keeps its authentic images at or under the target false-alarm rate. (Choosing the candidate on the
calibration part too made the threshold optimistic: twice the target false-alarm rate on fresh rows, in the tests.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.runtime.detector import Detector

MAP = ("map_top", "map_max", "map_mean", "map_area", "map_largest")
SPREAD = ("spread_mean", "spread_marked")
CUE = ("cue_area", "cue_transforms", "cue_residual", "cue_exact", "cue_pairs")
STRENGTHS = (0.1, 1.0, 10.0, 100.0)
FOLDS = 4


def candidate_sets(evidence_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The feature sets compared, from the old score alone to everything the runtime computes."""
    cond = tuple(n for n in evidence_names if n.startswith("cond_"))
    return {"top pixels (the old score)": ("map_top",), "map": MAP, "map + spread": MAP + SPREAD,
            "map + spread + cue": MAP + SPREAD + CUE, "map + spread + cue + encoder": MAP + SPREAD + CUE + cond}


class FitError(ValueError):
    """Rows that cannot give a detector (one class only, no evidence, an empty split)."""


def read_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    if not rows or any(not r.get("evidence") for r in rows):
        raise FitError("fit-detector needs `diffiml eval --rows` output from a bundle run (rows with evidence)")
    return rows


def photo_of(row: dict[str, Any], sources: dict[str, str]) -> str:
    """The row's source photo (sources.json keys are list-relative paths such as ``Tp/00012_splice.jpg``); the image
    itself when it is not listed."""
    parts = Path(row["image"]).parts
    return sources.get("/".join(parts[-2:]), row["image"])


def calibration_mask(rows: list[dict[str, Any]], sources: dict[str, str], fraction: float) -> np.ndarray:
    """True for rows whose source photo falls in the held-out calibration part (a stable hash of the photo)."""
    def held_out(photo: str) -> bool:  # salted: make-synthetic's own split hashes the same paths
        return int(hashlib.sha1(f"calibration:{photo}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction
    return np.array([held_out(photo_of(r, sources)) for r in rows])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias minimizing the summed log-loss + l2/2 |w|² (bias unpenalized), by Newton's method."""
    n, f = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    penalty = np.full(f + 1, l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ theta, -30, 30)))
        grad = xb.T @ (p - y) + penalty * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def threshold_for_rate(authentic_probabilities: np.ndarray, rate: float) -> float:
    """The smallest threshold t with share(p >= t) <= rate among the authentic images."""
    p = np.sort(authentic_probabilities)[::-1]
    allowed = int(np.floor(rate * len(p)))  # this many may lie at or above t
    return float(np.nextafter(p[allowed], np.inf)) if allowed < len(p) else 0.0


@dataclass
class Candidate:
    name: str
    names: tuple[str, ...]
    l2: float
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    cv_loss: float  # cross-validated log-loss within the fitting part (folds by photo)
    cv_auc: float

    def logits(self, rows: list[dict[str, Any]]) -> np.ndarray:
        x = np.array([[r["evidence"][n] for n in self.names] for r in rows], np.float64)
        return (x - self.mean) / self.scale @ self.weights + self.bias


def fit_candidate(name: str, names: tuple[str, ...], x_fit: np.ndarray, y_fit: np.ndarray, folds: np.ndarray
                  ) -> Candidate:
    """The strength with the lowest cross-validated log-loss (folds by photo, within the fitting part), refitted on
    the whole fitting part. The calibration part is not looked at: the threshold set on it stays honest."""
    from diffiml.benchmarks.metrics import auc

    best: tuple[float, float, float] | None = None
    for l2 in STRENGTHS:
        logits = np.zeros(len(y_fit))
        for k in np.unique(folds):
            train, held = folds != k, folds == k
            mean, scale = _standardize(x_fit[train])
            w, b = fit_logistic((x_fit[train] - mean) / scale, y_fit[train], l2)
            logits[held] = (x_fit[held] - mean) / scale @ w + b
        loss = log_loss(logits, y_fit)
        if best is None or loss < best[0]:
            best = (loss, l2, auc(logits, y_fit > 0))
    assert best is not None
    mean, scale = _standardize(x_fit)
    w, b = fit_logistic((x_fit - mean) / scale, y_fit, best[1])
    return Candidate(name, names, best[1], mean, scale, w, b, best[0], best[2])


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(scale > 1e-9, scale, 1.0)


def fit_detector(rows: list[dict[str, Any]], sources: dict[str, str], checkpoint_sha256: str,
                 target_false_alarm_rate: float = 0.05, calibration_fraction: float = 0.25,
                 only: str | None = None, calibration_rows: list[dict[str, Any]] | None = None
                 ) -> tuple[Detector, list[Candidate]]:
    """The detector, and every candidate feature set fitted (the chosen one included). ``calibration_rows``: rows of
    images from photos the model never trained on (make-synthetic's calibration.json), for Platt and the threshold;
    without them, ``calibration_fraction`` of the fitting rows' photos are held out instead."""
    if calibration_rows:
        rows = [*rows, *calibration_rows]
        cal = np.array([False] * (len(rows) - len(calibration_rows)) + [True] * len(calibration_rows))
    else:
        cal = calibration_mask(rows, sources, calibration_fraction)
    y = np.array([bool(r["manipulated"]) for r in rows], np.float64)
    for part, mask in (("fitting", ~cal), ("calibration", cal)):
        if len(set(y[mask])) < 2:
            raise FitError(f"the {part} part needs both manipulated and authentic rows")
    sets = candidate_sets(list(rows[0]["evidence"]))
    if only is not None:
        if only not in sets:
            raise FitError(f"unknown feature set {only!r}; choose one of {list(sets)}")
        sets = {only: sets[only]}
    photos = [photo_of(r, sources) for r, held in zip(rows, cal, strict=True) if not held]
    folds = np.array([int(hashlib.sha1(f"fold:{p}".encode()).hexdigest()[:8], 16) % FOLDS for p in photos])
    candidates = []
    for name, names in sets.items():
        x = np.array([[r["evidence"][n] for n in names] for r in rows], np.float64)
        candidates.append(fit_candidate(name, names, x[~cal], y[~cal], folds))
    chosen = min(candidates, key=lambda c: c.cv_loss)
    from diffiml.benchmarks.metrics import auc

    x = np.array([[r["evidence"][n] for n in chosen.names] for r in rows], np.float64)
    logits_cal = (x[cal] - chosen.mean) / chosen.scale @ chosen.weights + chosen.bias
    a, b = fit_logistic(logits_cal[:, None], y[cal], 0.0)
    # the probabilities as the runtime computes them, bit for bit: the threshold sits one float step above one
    unset = Detector(chosen.names, chosen.mean, chosen.scale, chosen.weights, chosen.bias, float(a[0]), b, 1.0,
                     target_false_alarm_rate, {})
    calibrated = np.array([unset.probability(r["evidence"]) for r, held in zip(rows, cal, strict=True) if held])
    threshold = threshold_for_rate(calibrated[y[cal] == 0], target_false_alarm_rate)
    record = {"checkpoint_sha256": checkpoint_sha256, "feature_set": chosen.name, "l2": chosen.l2,
              "rows_fitting": int((~cal).sum()), "rows_calibration": int(cal.sum()),
              "cv_auc": chosen.cv_auc, "cv_log_loss": chosen.cv_loss,
              "calibration_auc": auc(logits_cal, y[cal] > 0),
              "calibration_detection_rate": float((calibrated[y[cal] == 1] >= threshold).mean()),
              "calibration_false_alarm_rate": float((calibrated[y[cal] == 0] >= threshold).mean()),
              "prior_manipulated": float(y.mean())}
    detector = Detector(chosen.names, chosen.mean, chosen.scale, chosen.weights, chosen.bias, float(a[0]), b,
                        threshold, target_false_alarm_rate, record)
    return detector, candidates


def applied(detector: Detector, rows: list[dict[str, Any]]) -> dict[str, float]:
    """What the bundle with ``detector`` gives on rows of ``eval --rows`` from the same bundle without it (the
    evidence is the same): image AUC, the decision's detection and false-alarm rates, authentic images left with a
    marked pixel and the mean F1 over forgeries when masks follow the decision (a forgery judged authentic gets an
    empty mask, F1 0), and the same without following it (``_without``: the default masks)."""
    from diffiml.benchmarks.metrics import auc

    p = np.array([detector.probability(r["evidence"]) for r in rows])
    y = np.array([bool(r["manipulated"]) for r in rows])
    decision = p >= detector.threshold
    marked = np.array([bool(r.get("marked", False)) for r in rows])
    f1 = np.array([float(r["f1"]) for r in rows])
    nan = float("nan")
    return {"n": len(rows), "authentic": int((~y).sum()), "image_auc": auc(p, y),
            "detection_rate": float(decision[y].mean()) if y.any() else nan,
            "false_alarm_rate": float(decision[~y].mean()) if (~y).any() else nan,
            "authentic_marked": float((decision & marked)[~y].mean()) if (~y).any() else nan,
            "authentic_marked_without": float(marked[~y].mean()) if (~y).any() else nan,
            "f1": float((f1 * decision)[y].mean()) if y.any() else nan,
            "f1_without": float(f1[y].mean()) if y.any() else nan}
