"""A synthetic forgery set: real photographs shipped with scikit-image (public-domain / CC0 sample images) and
procedural scenes, manipulated by splicing, copy-move, OpenCV inpainting (object removal), local blur and local
re-compression, each with its binary mask, written in IMDLBenCo's JSON format.

``holdout_type`` keeps one manipulation type out of training entirely (``holdout.json``) to measure
generalization to an unseen manipulation, as the paper's cross-dataset protocols do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from diffiml.files import write_png_atomic, write_text_atomic
from diffiml.train.data.augment import jpeg

log = logging.getLogger(__name__)
MANIPULATIONS = ("splice", "copymove", "inpaint", "blur", "recompress")
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
               "motorcycle_left", "horse", "moon", "page", "coins", "grass", "gravel", "brick", "colorwheel")


def bundled_photos() -> list[np.ndarray]:
    """The scikit-image sample photographs that are available offline, as RGB uint8."""
    from skimage import data

    photos = []
    for name in PHOTO_NAMES:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception as exc:  # noqa: BLE001 - an image missing from this scikit-image build is skipped
            log.debug("skimage.data.%s unavailable: %s", name, exc)
            continue
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float32) / max(float(img.max()), 1.0))).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if min(img.shape[:2]) >= 128:
            photos.append(np.ascontiguousarray(img[..., :3]))
    return photos


def procedural_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient background with random shapes, texture noise and a camera-like blur."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = (c0 * (1 - ramp) + c1 * ramp).astype(np.float32)
    for _ in range(int(rng.integers(4, 12))):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        if rng.random() < 0.5:
            cv2.circle(img, center, int(rng.integers(size // 20, size // 4)), color, -1)
        else:
            pts = rng.integers(0, size, (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], color)
    img += rng.normal(0, rng.uniform(2, 10), img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 1.2))
    return np.clip(img, 0, 255).astype(np.uint8)


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = photo.shape[:2]
    s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return cv2.resize(photo[y : y + s, x : x + s], (size, size), interpolation=cv2.INTER_AREA)


def region_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random blob (ellipse, polygon or rectangle) covering roughly 2-25 % of the image, {0,1} uint8."""
    m = np.zeros((size, size), np.uint8)
    kind = rng.integers(0, 3)
    cx, cy = (int(v) for v in rng.integers(size // 5, 4 * size // 5, 2))
    r = int(rng.integers(size // 12, size // 4))
    if kind == 0:
        axes = (r, int(r * rng.uniform(0.4, 1.0)))
        cv2.ellipse(m, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 10))))
        radii = r * rng.uniform(0.5, 1.0, angles.size)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(m, [pts], 1)
    else:
        w, h = (int(r * rng.uniform(0.6, 1.4)) for _ in range(2))
        m[max(0, cy - h) : cy + h, max(0, cx - w) : cx + w] = 1
    return m


def _paste(dst: np.ndarray, src: np.ndarray, region: np.ndarray) -> np.ndarray:
    out = dst.copy()
    out[region > 0] = src[region > 0]
    return out


def manipulate(kind: str, base: np.ndarray, donor: np.ndarray, region: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
    if kind == "splice":
        if rng.random() < 0.5:
            donor = jpeg(donor, int(rng.integers(40, 90)))
        return _paste(base, donor, region)
    if kind == "copymove":
        size = base.shape[0]
        dx, dy = (int(v) for v in rng.integers(-size // 3, size // 3, 2))
        shifted = np.roll(base, (dy, dx), axis=(0, 1))
        return _paste(base, shifted, region)
    if kind == "inpaint":
        method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
        return cv2.inpaint(base, region, int(rng.integers(3, 8)), method)
    if kind == "blur":
        k = int(rng.choice([5, 7, 9]))
        return _paste(base, cv2.GaussianBlur(base, (k, k), 0), region)
    if kind == "recompress":
        return _paste(base, jpeg(base, int(rng.integers(10, 40))), region)
    raise ValueError(f"unknown manipulation {kind!r}; choose one of {MANIPULATIONS}")


def _write_png(path: Path, array: np.ndarray) -> None:
    write_png_atomic(path, array[..., ::-1] if array.ndim == 3 else array)


def make_synthetic(out: str | Path, n: int, seed: int = 0, size: int = 256, holdout_type: str | None = None,
                   authentic_rate: float = 0.1, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write ``n`` images + masks under ``out`` and the lists train.json, test.json (10 %) and holdout.json.

    Returns the number of rows per list.
    """
    if holdout_type is not None and holdout_type not in MANIPULATIONS:
        raise ValueError(f"unknown --holdout-type {holdout_type!r}; choose one of {MANIPULATIONS}")
    out = Path(out)
    (out / "Tp").mkdir(parents=True, exist_ok=True)
    (out / "Gt").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    lists: dict[str, list[list[str]]] = {"train": [], "test": [], "holdout": []}

    def source() -> np.ndarray:
        if photos and rng.random() < 0.6:
            return random_crop(photos[int(rng.integers(len(photos)))], rng, size)
        return procedural_scene(rng, size)

    for i in range(n):
        base = source()
        if rng.random() < 0.5:  # a camera-like global JPEG history, shared by the whole image
            base = jpeg(base, int(rng.integers(75, 100)))
        if rng.random() < authentic_rate:
            kind, image, mask = "authentic", base, None
        else:
            kind = MANIPULATIONS[int(rng.integers(len(MANIPULATIONS)))]
            region = region_mask(rng, size)
            image, mask = manipulate(kind, base, source(), region, rng), region
        stem = f"{i:05d}_{kind}"
        _write_png(out / "Tp" / f"{stem}.png", image)
        row = [f"Tp/{stem}.png", "Negative"]
        if mask is not None:
            _write_png(out / "Gt" / f"{stem}.png", mask * 255)
            row[1] = f"Gt/{stem}.png"
        split = "holdout" if kind == holdout_type else ("test" if rng.random() < 0.1 else "train")
        lists[split].append(row)
        if progress:
            progress(i)
    for name, rows in lists.items():
        write_text_atomic(out / f"{name}.json", json.dumps(rows, indent=0))
    return {k: len(v) for k, v in lists.items()}
