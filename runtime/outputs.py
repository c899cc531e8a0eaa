"""Writing a localization to disk: mask, 16-bit probability, overlay and uncertainty PNGs, each written to a
temporary name and renamed, so an interrupted run never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from diffiml.files import write_png_atomic
from diffiml.runtime.localizer import LocalizationResult


def write_png(path: Path, array: np.ndarray) -> Path:
    return write_png_atomic(path, array)


MAX_OVERLAY_SIDE = 4096  # px, the overlay's longest side: a picture to look at, not a measurement


def heat_overlay(rgb: np.ndarray, probability: np.ndarray, alpha: float = 0.5,
                 max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """BGR uint8: the image with a JET heatmap of the probability blended in where it is high; at the image's size,
    or its longest side ``max_side``. Blended in strips of rows: a 100 MP image never holds full-size floats."""
    scale = max_side / max(rgb.shape[:2])
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    height, width = rgb.shape[:2]
    prob = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
    out = np.empty((height, width, 3), np.uint8)
    step = max(1, (1 << 20) // width)
    for y in range(0, height, step):
        p = prob[y : y + step]
        heat = cv2.applyColorMap((p * 255).astype(np.uint8), cv2.COLORMAP_JET)
        weight = (alpha * p)[..., None]
        out[y : y + step] = (rgb[y : y + step, :, ::-1] * (1 - weight) + heat * weight).astype(np.uint8)
    return out


def write_outputs(result: LocalizationResult, rgb: np.ndarray, out_dir: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>_mask.png``, ``<stem>_prob.png`` (16-bit), ``<stem>_overlay.png`` (at the decoded size, at most
    ``MAX_OVERLAY_SIDE`` long)
    and, when computed, ``<stem>_uncertainty.png`` (16-bit); returns their paths by kind. The mask and the overlay
    follow the image-level decision when asked (``follow_decision``: empty for an image judged authentic); the
    probability map is the model's, always."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prob16 = result.probability16()
    paths = {"prob": write_png(out_dir / f"{stem}_prob.png", prob16)}
    marked = (prob16 >= 32768) & result.regions_shown  # empty for an image judged authentic
    paths["mask"] = write_png(out_dir / f"{stem}_mask.png", (marked * np.uint8(255)).astype(np.uint8))
    del prob16, marked
    paths["overlay"] = write_png(out_dir / f"{stem}_overlay.png", heat_overlay(rgb, result.shown_probability))
    unc16 = result.uncertainty16()
    if unc16 is not None:
        paths["uncertainty"] = write_png(out_dir / f"{stem}_uncertainty.png", unc16)
    return {k: str(v) for k, v in paths.items()}
