"""``bench matching``: the copy-move cue's k-nearest-neighbour matching, exact (OpenCV's brute force, what the cue
runs) against approximate (FLANN's randomized k-d trees) on the cue's own SIFT descriptors: time, recall of the
exact top 3, and whether two runs of the approximate one agree (the cue's answer must not change between runs)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from diffiml.runtime.copy_move import CopyMoveCue


def _descriptors(path: Path, cue: CopyMoveCue) -> np.ndarray:
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    scale = cue.max_side / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    sift = cv2.SIFT_create(nfeatures=cue.max_keypoints, contrastThreshold=cue.contrast_threshold)
    return sift.detectAndCompute(gray, None)[1]


def _knn(matcher: cv2.DescriptorMatcher, desc: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    matches = matcher.knnMatch(desc, desc, k=k)
    ms = (time.perf_counter() - t0) * 1000
    return np.array([[m.trainIdx for m in row] for row in matches]), ms


def bench_matching(images: list[Path], checks: tuple[int, ...] = (32, 64, 128)) -> list[dict]:
    cue = CopyMoveCue()
    k = cue.neighbours + 1
    rows: dict[str, dict[str, list[float]]] = {}
    for path in images:
        desc = _descriptors(path, cue)
        if desc is None or len(desc) < k:
            continue
        exact, ms = _knn(cv2.BFMatcher(cv2.NORM_L2), desc, k)
        rows.setdefault("exact (brute force)", {}).setdefault("ms", []).append(ms)
        rows["exact (brute force)"].setdefault("recall_top3", []).append(1.0)
        rows["exact (brute force)"].setdefault("runs_agree", []).append(1.0)
        for c in checks:
            name = f"FLANN, 4 k-d trees, {c} checks"
            first, ms = _knn(cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": c}), desc, k)
            second, _ = _knn(cv2.FlannBasedMatcher({"algorithm": 1, "trees": 4}, {"checks": c}), desc, k)
            recall = np.mean([len(set(a[:3]) & set(b[:3])) / 3 for a, b in zip(first, exact, strict=True)])
            row = rows.setdefault(name, {})
            row.setdefault("ms", []).append(ms)
            row.setdefault("recall_top3", []).append(float(recall))
            row.setdefault("runs_agree", []).append(float((first[:, :3] == second[:, :3]).all(axis=1).mean()))
    return [{"matcher": name, "images": len(v["ms"]), "ms_median": round(statistics.median(v["ms"]), 1),
             "recall_top3": round(float(np.mean(v["recall_top3"])), 3),
             "rows_same_in_two_runs": round(float(np.mean(v["runs_agree"])), 3)} for name, v in rows.items()]
