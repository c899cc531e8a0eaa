"""Readers for the field's dataset layouts (IMDLBenCo): a JSON list of [image, mask | "Negative"] pairs (an
optional third field names the manipulation type, for per-type evaluation), and a folder of ``Tp/`` images with
``Gt/`` masks matched by file stem.

Bad rows (missing files, unreadable images, size mismatches) are reported with the file name and skipped, so a long
epoch never dies on one broken file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)
NEGATIVE = "Negative"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


class DatasetError(ValueError):
    """A dataset description that cannot be used at all (not one bad row)."""


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None  # None: authentic image, all-zero mask
    type: str | None = None  # manipulation type, when the list names it (third field of a row)


def _read_bytes(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None or data.size == 0:
        raise ValueError(f"{path}: missing or empty file")
    return data


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or ValueError naming the file."""
    img = cv2.imdecode(_read_bytes(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 in {0, 1}: binarized at half of the mask's value range."""
    m = cv2.imdecode(_read_bytes(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise ValueError(f"{path}: not a readable mask")
    if m.ndim == 3:
        m = m[..., :3].max(axis=2)
    full = 65535 if m.dtype == np.uint16 else (1.0 if m.dtype.kind == "f" else 255)
    return (m.astype(np.float32) >= 0.5 * full).astype(np.uint8)


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    image = read_rgb(sample.image)
    if sample.mask is None:
        return image, np.zeros(image.shape[:2], np.uint8)
    mask = read_mask(sample.mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{sample.mask}: mask size {mask.shape[::-1]} differs from image size {image.shape[1::-1]}")
    return image, mask


def read_json_list(path: str | Path) -> list[Sample]:
    """IMDLBenCo JSON: ``[[image, mask], [image, "Negative"], ...]``; relative paths are relative to the file.
    A row may carry a third string, its manipulation type (``[image, mask, "copymove"]``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read dataset list ({exc})") from exc
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of [image, mask] pairs")
    samples = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) in (2, 3) and all(isinstance(x, str) for x in row)):
            log.warning("%s: row %d is not an [image, mask(, type)] row of strings; skipped", path, i)
            continue
        image = (path.parent / row[0]).resolve()
        mask = None if row[1] == NEGATIVE else (path.parent / row[1]).resolve()
        missing = [p for p in (image, mask) if p is not None and not p.is_file()]
        if missing:
            log.warning("%s: row %d refers to missing file %s; skipped", path, i, missing[0])
            continue
        samples.append(Sample(image, mask, row[2] if len(row) == 3 else None))
    return samples


def read_tp_gt_folder(root: str | Path) -> list[Sample]:
    """``root/Tp/*`` images, ``root/Gt/<stem>*`` masks; an image without a mask counts as authentic."""
    root = Path(root)
    tp, gt = root / "Tp", root / "Gt"
    if not tp.is_dir():
        raise DatasetError(f"{root}: no Tp/ folder")
    masks: dict[str, Path] = {}
    if gt.is_dir():
        for m in sorted(gt.iterdir()):
            if m.suffix.lower() in IMAGE_SUFFIXES:
                stem = m.stem.removesuffix("_gt").removesuffix("_mask")
                masks.setdefault(stem, m)
    return [
        Sample(p, masks.get(p.stem))
        for p in sorted(tp.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


def read_dataset(path: str | Path) -> list[Sample]:
    """A JSON list file or a Tp/Gt folder."""
    path = Path(path)
    if path.is_dir():
        return read_tp_gt_folder(path)
    if path.suffix.lower() == ".json":
        return read_json_list(path)
    raise DatasetError(f"{path}: expected a .json list or a folder with Tp/ and Gt/")
