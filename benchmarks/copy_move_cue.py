"""``diffiml bench copy-move-cue``: the classical copy-move cue alone, over a grid of its settings, on a data list.

How the cue's settings were chosen: per manipulation type, the mean per-image F1 of the cue's own mask (threshold
0.5, as ``eval``), and how often it marks anything on authentic images and on splices (false alarms: the fused map
then shows a region the model did not). Run it on a synthetic split, never on the images the model is judged on.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from diffiml.benchmarks.groups import manipulation_type
from diffiml.benchmarks.metrics import pixel_f1
from diffiml.runtime.copy_move import CopyMoveCue, find_copy_moves
from diffiml.runtime.image_io import load_image


def parse_settings(text: str) -> list[dict[str, Any]]:
    """``"ncc_threshold=0.85,0.92;min_inliers=4,6"`` -> the grid's settings (each a dict of overrides), defaults
    first."""
    grid: list[dict[str, Any]] = [{}]
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        field_type = type(getattr(CopyMoveCue(), name.strip()))
        parsed = [field_type(v) if field_type is not bool else v.strip().lower() in ("1", "true", "yes")
                  for v in values.split(",")]
        grid += [{name.strip(): v} for v in parsed]
    return grid


def cue_grid(samples: list, settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    images = []
    for s in samples:
        rgb = load_image(s.image).rgb
        truth = None if s.mask is None else cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) >= 128
        images.append((rgb, truth, manipulation_type(s.image, s.type) or ("authentic" if s.mask is None else "?")))
    rows = []
    for overrides in settings:
        cue = replace(CopyMoveCue(), **overrides)
        f1s: dict[str, list[float]] = {}
        fired: dict[str, list[bool]] = {}
        t0 = time.perf_counter()
        for rgb, truth, kind in images:
            mask = find_copy_moves(rgb, cue).mask
            fired.setdefault(kind, []).append(bool(mask.any()))
            if truth is not None and truth.any():
                pred = cv2.resize(mask, truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
                f1s.setdefault(kind, []).append(pixel_f1(pred, truth))
        rows.append({"settings": overrides or "defaults",
                     "ms_per_image": (time.perf_counter() - t0) * 1000 / max(1, len(images)),
                     **{f"f1 {k} ({len(v)})": float(np.mean(v)) for k, v in sorted(f1s.items())},
                     **{f"fires on {k} ({len(v)})": float(np.mean(v)) for k, v in sorted(fired.items())}})
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    return "\n".join(lines) + "\n"
