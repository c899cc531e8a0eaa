"""``diffiml eval --robustness``: F1 under JPEG compression, Gaussian blur and Gaussian noise (the paper's Fig. 4)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffiml.benchmarks.evaluate import evaluate
from diffiml.files import atomic_path

PERTURBATIONS: dict[str, list[float]] = {
    "jpeg_quality": [100, 90, 80, 70, 60, 50],
    "gaussian_blur_kernel": [0, 3, 7, 11, 15],
    "gaussian_noise_std": [0, 3, 7, 11, 15],
}


def perturbation(kind: str, level: float) -> Callable[[np.ndarray], np.ndarray] | None:
    if kind == "jpeg_quality":
        def jpeg(rgb: np.ndarray) -> np.ndarray:
            ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(level)])
            return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
        return jpeg
    if level == 0:
        return None
    if kind == "gaussian_blur_kernel":
        return lambda rgb: cv2.GaussianBlur(rgb, (int(level), int(level)), 0)
    if kind == "gaussian_noise_std":
        def noise(rgb: np.ndarray) -> np.ndarray:
            rng = np.random.default_rng(0)  # the same noise for every run: comparable numbers
            return np.clip(rgb + rng.normal(0, level, rgb.shape), 0, 255).astype(np.uint8)
        return noise
    raise ValueError(f"unknown perturbation {kind!r}")


def robustness(localizer: Any, samples: list, name: str) -> dict[str, list[dict[str, float]]]:
    return {kind: [{"level": level, "f1": evaluate(localizer, samples, f"{name}:{kind}={level}",
                                                   perturbation(kind, level))[0]["f1"]} for level in levels]
            for kind, levels in PERTURBATIONS.items()}


def plot(result: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (kind, rows) in zip(axes, result.items(), strict=True):
        ax.plot([r["level"] for r in rows], [r["f1"] for r in rows], marker="o")
        ax.set_xlabel(kind.replace("_", " "))
        ax.set_ylabel("pixel F1 (0.5)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if kind == "jpeg_quality":
            ax.invert_xaxis()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
