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


def heat_overlay(rgb: np.ndarray, probability: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """BGR uint8: the image with a JET heatmap of the probability blended in where it is high."""
    prob = cv2.resize(probability, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((prob * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (alpha * prob)[..., None]
    return (rgb[..., ::-1] * (1 - weight) + heat * weight).astype(np.uint8)


def write_outputs(result: LocalizationResult, rgb: np.ndarray, out_dir: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>_mask.png``, ``<stem>_prob.png`` (16-bit), ``<stem>_overlay.png`` (at the decoded size)
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
