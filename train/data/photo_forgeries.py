"""Training forgeries made from real photographs: splicing, copy-move and removal, with the processing chains that
real forgeries carry (different JPEG histories for donor and host, resampling, feathered edges, colour matching,
local and global post-processing), plus authentic images with empty masks.

Photos are split by source before anything is made (a stable hash of the file's path under the photo folder): a
photo that feeds ``train.json`` never appears in ``test.json`` or ``holdout.json``. ``holdout_type`` (removal by
inpainting, by default) is made only from the evaluation photos and never enters ``train.json``.

BSDS500 photos come with human segmentations (16-bit label maps); their segments give object-shaped regions. Other
photos get random blobs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from diffiml.files import write_bytes_atomic
from diffiml.train.data.augment import jpeg

PHOTO_MANIPULATIONS = ("splice", "copymove", "inpaint")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MAX_SIDE = 768  # photos are brought to at most this long side first, as a camera pipeline would
MIN_AREA, MAX_AREA = 0.01, 0.3  # fraction of the image a manipulated region covers
COPY_AREA = (0.002, 0.12)  # fraction of the image a copied region covers (log-uniform)
CALIBRATION_SHARE = 1 / 3  # of the evaluation photos: their images go to calibration.json, not test.json


@dataclass(frozen=True)
class Photo:
    path: Path
    segments: Path | None  # 16-bit label map of the same size (BSDS500), or None


def find_photos(root: str | Path) -> list[Photo]:
    """Every image under ``root`` (segment maps excluded), with its BSDS500 segmentation when there is one."""
    root = Path(root)
    photos = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or "segments" in path.relative_to(root).parts:
            continue
        rel = path.relative_to(root).parts
        seg = None
        if "images" in rel:
            i = rel.index("images")
            candidate = root.joinpath(*rel[:i], "segments", *rel[i + 1 : -1], path.stem + ".png")
            seg = candidate if candidate.is_file() else None
        photos.append(Photo(path, seg))
    if not photos:
        raise ValueError(f"{root}: no photographs found")
    return photos


def is_eval_photo(photo: Photo, root: Path, eval_fraction: float) -> bool:
    """A stable split by source photo: the same photo lands on the same side on every machine and every run."""
    key = photo.path.relative_to(root).as_posix().encode()
    return int(hashlib.sha1(key).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction


def is_calibration_photo(photo: Photo, root: Path, share: float = CALIBRATION_SHARE) -> bool:
    """Among the evaluation photos, those whose images calibrate the image-level detector (``calibration.json``)
    rather than test it: a second stable hash, salted, so it is independent of the first split."""
    key = b"calibration:" + photo.path.relative_to(root).as_posix().encode()
    return int(hashlib.sha1(key).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def read_photo(photo: Photo) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB uint8 at most MAX_SIDE long, and its segment labels (same size) or None."""
    bgr = cv2.imread(str(photo.path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{photo.path}: not a readable image")
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    labels = cv2.imread(str(photo.segments), cv2.IMREAD_UNCHANGED) if photo.segments else None
    if labels is not None and labels.shape[:2] != image.shape[:2]:
        labels = None
    scale = MAX_SIDE / max(image.shape[:2])
    if scale < 1:
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        if labels is not None:
            labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    return image, labels


def blob_mask(rng: np.random.Generator, h: int, w: int, area: float | None = None) -> np.ndarray:
    """An organic random region of about ``area`` of the image (default: random): smoothed noise thresholded, its
    largest component; {0,1} uint8."""
    grid = rng.normal(size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    field += rng.normal(0, 0.15, (h, w)).astype(np.float32) * (rng.random() < 0.3)
    area = rng.uniform(MIN_AREA * 2, MAX_AREA * 0.8) if area is None else area
    region = (field > np.quantile(field, 1 - area)).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    if n > 2:
        region = (comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    return region


def object_mask(labels: np.ndarray | None, rng: np.random.Generator, h: int, w: int, area: float | None = None
                ) -> np.ndarray:
    """One human-segmented object of a reasonable size (within a factor 2 of ``area`` when given), or a random
    blob."""
    if labels is not None and rng.random() < 0.85:
        ids, counts = np.unique(labels, return_counts=True)
        frac = counts / labels.size
        lo, hi = (MIN_AREA, MAX_AREA) if area is None else (area / 2, area * 2)
        good = ids[(frac >= lo) & (frac <= hi)]
        if good.size:
            region = (labels == rng.choice(good)).astype(np.uint8)
            return cv2.morphologyEx(region, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return blob_mask(rng, h, w, area)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def transform_patch(patch: np.ndarray, region: np.ndarray, rng: np.random.Generator, scale: float,
                    max_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a cut-out (and its region) by scale, rotation and a possible flip, on a canvas that holds it all."""
    h, w = region.shape
    angle = float(rng.uniform(-max_angle, max_angle)) if rng.random() < 0.5 else 0.0
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ m.T
    lo, hi = corners.min(0), corners.max(0)
    m[:, 2] -= lo
    size = (max(1, int(np.ceil(hi[0] - lo[0]))), max(1, int(np.ceil(hi[1] - lo[1]))))
    interp = int(rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST, cv2.INTER_AREA]))
    out = cv2.warpAffine(patch, m, size, flags=interp, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(region.astype(np.float32), m, size, flags=cv2.INTER_LINEAR) > 0.5
    if rng.random() < 0.5:
        out, mask = out[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(out), np.ascontiguousarray(mask.astype(np.uint8))


def match_colour(patch: np.ndarray, region: np.ndarray, host: np.ndarray, strength: float) -> np.ndarray:
    """Move the patch's Lab mean and spread toward the host's, as a forger's colour correction does."""
    src = cv2.cvtColor(patch, cv2.COLOR_RGB2LAB).astype(np.float32)
    dst = cv2.cvtColor(host, cv2.COLOR_RGB2LAB).astype(np.float32).reshape(-1, 3)
    inside = src[region > 0]
    if inside.size == 0:
        return patch
    mu_s, sd_s = inside.mean(0), inside.std(0) + 1e-3
    mu_d, sd_d = dst.mean(0), dst.std(0) + 1e-3
    matched = (src - mu_s) * (sd_d / sd_s) + mu_d
    out = src + strength * (matched - src)
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def local_processing(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, sharpen or noise on the pasted content only."""
    r = rng.random()
    if r < 0.3:
        return cv2.GaussianBlur(patch, (0, 0), float(rng.uniform(0.4, 1.5)))
    if r < 0.5:
        noise = rng.normal(0, rng.uniform(2, 8), patch.shape)
        return np.clip(patch + noise, 0, 255).astype(np.uint8)
    if r < 0.6:
        soft = cv2.GaussianBlur(patch, (0, 0), 1.0)
        return cv2.addWeighted(patch, 1.6, soft, -0.6, 0)
    return patch


def composite(host: np.ndarray, patch: np.ndarray, region: np.ndarray, y: int, x: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``patch`` (where ``region``) at (y, x) with a hard or feathered edge; returns the image and the mask."""
    h, w = region.shape
    alpha = region.astype(np.float32)
    if rng.random() < 0.6:
        alpha = cv2.GaussianBlur(alpha, (0, 0), float(rng.uniform(0.5, 3.0)))
    out = host.astype(np.float32)
    window = out[y : y + h, x : x + w]
    window[:] = window * (1 - alpha[..., None]) + patch.astype(np.float32) * alpha[..., None]
    mask = np.zeros(host.shape[:2], np.uint8)
    mask[y : y + h, x : x + w] = alpha > 0.5
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


def _fit_and_place(host: np.ndarray, patch: np.ndarray, region: np.ndarray, rng: np.random.Generator,
                   avoid: np.ndarray | None = None, min_fraction: float = MIN_AREA * 0.5
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Shrink a cut-out to fit the host if needed and paste it at a random place (away from ``avoid``)."""
    H, W = host.shape[:2]
    h, w = region.shape
    if h > H or w > W:
        s = 0.95 * min(H / h, W / w)
        size = (max(1, int(w * s)), max(1, int(h * s)))
        patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
        region = cv2.resize(region, size, interpolation=cv2.INTER_NEAREST)
        h, w = region.shape
    if region.sum() < min_fraction * H * W:
        return None
    for _ in range(20):
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        if avoid is None or (avoid[y : y + h, x : x + w] & region).sum() < 0.1 * region.sum():
            return composite(host, patch, region, y, x, rng)
    return None


def splice(host: np.ndarray, donor: np.ndarray, donor_labels: np.ndarray | None, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray] | None:
    H, W = host.shape[:2]
    region = object_mask(donor_labels, rng, *donor.shape[:2])
    if region.sum() == 0:
        return None
    y0, y1, x0, x1 = _bbox(region)
    target = rng.uniform(MIN_AREA * 2, MAX_AREA * 0.8) * H * W
    scale = float(np.clip(np.sqrt(target / region.sum()), 0.3, 2.5))
    patch, cut = transform_patch(donor[y0:y1, x0:x1], region[y0:y1, x0:x1], rng, scale, max_angle=25)
    if rng.random() < 0.5:
        patch = match_colour(patch, cut, host, float(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.4:
        patch = local_processing(patch, rng)
    return _fit_and_place(host, patch, cut, rng)


def brightness_shift(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small gain and offset on the copy, as a forger's touch-up to blend it in."""
    gain = rng.uniform(0.9, 1.1, size=3) if rng.random() < 0.5 else np.full(3, rng.uniform(0.9, 1.1))
    out = patch.astype(np.float32) * gain + float(rng.uniform(-12, 12))
    return np.clip(out, 0, 255).astype(np.uint8)


def copy_move(host: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator, mark_source: bool,
              exact_share: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """An object (BSDS segment) or blob copied within the photo: translated, often rotated (±45°), scaled
    (0.7-1.4), flipped, retouched; pasted once, or two or three times as real copy-moves often are. The mask marks
    the pasted copies, and the source too when ``mark_source`` (NoSo's convention; CASIA marks the copy only).

    ``exact_share``: the share of copies pasted as they are, translated only (no resampling, no touch-up), as most
    real copy-moves (NoSo, CASIA ``Tp_S``) are: the copy carries its source's pixels, noise included."""
    # Real copy-moves are small (NoSo, CASIA: most copies cover 0.2-5 % of the image): the copied region's area
    # is log-uniform over 0.2-12 %.
    area = float(np.exp(rng.uniform(np.log(COPY_AREA[0]), np.log(COPY_AREA[1]))))
    region = object_mask(labels, rng, *host.shape[:2], area=area)
    if region.sum() == 0:
        return None
    y0, y1, x0, x1 = _bbox(region)
    copies = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
    image, mask, avoid = host, np.zeros(host.shape[:2], np.uint8), region.copy()
    exact = exact_share > 0 and rng.random() < exact_share  # no draw at 0: older lists are made again bit for bit
    for _ in range(copies):
        if exact:
            patch, cut = host[y0:y1, x0:x1].copy(), region[y0:y1, x0:x1].copy()
        else:
            patch, cut = transform_patch(host[y0:y1, x0:x1], region[y0:y1, x0:x1], rng,
                                         float(rng.uniform(0.7, 1.4)), max_angle=45)
            if rng.random() < 0.3:
                patch = brightness_shift(patch, rng)
            if rng.random() < 0.3:
                patch = local_processing(patch, rng)
        placed = _fit_and_place(image, patch, cut, rng, avoid=avoid, min_fraction=COPY_AREA[0] * 0.5)
        if placed is None:
            break
        image, pasted = placed
        mask, avoid = np.maximum(mask, pasted), np.maximum(avoid, pasted)
    if not mask.any():
        return None
    if mark_source:
        mask = np.maximum(mask, region)
    return image, mask


def removal(host: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray] | None:
    region = object_mask(labels, rng, *host.shape[:2])
    if region.sum() == 0:
        return None
    region = cv2.dilate(region, np.ones((5, 5), np.uint8))
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    return cv2.inpaint(host, region, int(rng.integers(3, 8)), method), region


def camera_history(image: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """A random crop and the JPEG the photo was saved as before anyone touched it; the segment map (when there is
    one) is cropped with the image, so object-shaped regions survive the crop."""
    if rng.random() < 0.5:
        h, w = image.shape[:2]
        s = rng.uniform(0.6, 1.0)
        ch, cw = max(64, int(h * s)), max(64, int(w * s))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = image[y : y + ch, x : x + cw]
        labels = None if labels is None else np.ascontiguousarray(labels[y : y + ch, x : x + cw])
    if rng.random() < 0.8:
        image = jpeg(image, int(rng.integers(60, 101)))
    return np.ascontiguousarray(image), labels


def post_processing(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """What happens to a forgery after the edit: resampling, blur, noise (the final save comes after)."""
    if rng.random() < 0.3:
        s = rng.uniform(0.5, 1.0)
        size = (max(64, int(image.shape[1] * s)), max(64, int(image.shape[0] * s)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.15:
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.15:
        image = np.clip(image + rng.normal(0, rng.uniform(1, 4), image.shape), 0, 255).astype(np.uint8)
    return image, mask


def encode(image: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """The final save: JPEG at a random quality, or lossless PNG."""
    bgr = np.ascontiguousarray(image[..., ::-1])
    if rng.random() < 0.6:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 101))])
        suffix = ".jpg"
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        suffix = ".png"
    if not ok:
        raise OSError("could not encode an image")
    return buf.tobytes(), suffix


def make_photo_forgeries(photo_root: str | Path, out: str | Path, n: int, seed: int = 0,
                         holdout_type: str | None = "inpaint", authentic_rate: float = 0.2,
                         eval_fraction: float = 0.15, copymove_marks_source: bool = True,
                         copymove_share: float = 0.5, exact_copy_share: float = 0.0,
                         progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write ``n`` forgeries (and authentic images) under ``out`` with train.json, calibration.json, test.json and
    holdout.json. The evaluation photos are split once more: a third of them (``is_calibration_photo``) feed
    calibration.json (the detector's threshold is set there), the rest test.json.

    ``copymove_share``: the share of manipulated images that are copy-moves (the rest: the other types, evenly).
    ``exact_copy_share``: the share of copy-moves pasted unresampled and untouched (``copy_move``'s ``exact_share``).
    Beside the lists, ``sources.json`` names each image's host photo (for splits by photo downstream).
    Returns the number of rows per list and the number of photos on each side of the split.
    """
    if holdout_type is not None and holdout_type not in PHOTO_MANIPULATIONS:
        raise ValueError(f"unknown --holdout-type {holdout_type!r}; choose one of {PHOTO_MANIPULATIONS}")
    root, out = Path(photo_root), Path(out)
    photos = find_photos(root)
    sides = {"train": [p for p in photos if not is_eval_photo(p, root, eval_fraction)],
             "eval": [p for p in photos if is_eval_photo(p, root, eval_fraction)]}
    if not sides["train"] or not sides["eval"]:
        raise ValueError(f"{root}: too few photos to split into training and evaluation sources")
    (out / "Tp").mkdir(parents=True, exist_ok=True)
    (out / "Gt").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lists: dict[str, list[list[str]]] = {"train": [], "calibration": [], "test": [], "holdout": []}
    sources: dict[str, str] = {}  # image -> its host photo, for splits by photo downstream (detector calibration)
    cache: dict[Path, tuple[np.ndarray, np.ndarray | None]] = {}

    def load(photo: Photo) -> tuple[np.ndarray, np.ndarray | None]:
        if photo.path not in cache:
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
            cache[photo.path] = read_photo(photo)
        return cache[photo.path]

    i = 0
    while i < n:
        side = "eval" if rng.random() < eval_fraction else "train"
        pool = sides[side]
        host_photo = pool[int(rng.integers(len(pool)))]
        host_full, labels = load(host_photo)
        others = [k for k in PHOTO_MANIPULATIONS if k != "copymove" and (side == "eval" or k != holdout_type)]
        if rng.random() < authentic_rate:
            kind = "authentic"
        else:
            kind = "copymove" if rng.random() < copymove_share or not others else str(rng.choice(others))
        host, labels = camera_history(host_full, labels, rng)
        if kind == "authentic":
            result: tuple[np.ndarray, np.ndarray] | None = (host, np.zeros(host.shape[:2], np.uint8))
        elif kind == "splice":
            donor_photo = pool[int(rng.integers(len(pool)))]
            donor, donor_labels = load(donor_photo)
            if rng.random() < 0.8:
                donor = jpeg(donor, int(rng.integers(50, 101)))
            result = splice(host, donor, donor_labels, rng)
        elif kind == "copymove":
            result = copy_move(host, labels, rng, copymove_marks_source, exact_copy_share)
        else:
            result = removal(host, labels, rng)
        if result is None:
            continue
        image, mask = post_processing(*result, rng)
        data, suffix = encode(image, rng)
        stem = f"{i:05d}_{kind}"
        write_bytes_atomic(out / "Tp" / f"{stem}{suffix}", data)
        row = [f"Tp/{stem}{suffix}", "Negative", kind]  # the third field: the type, for per-type evaluation
        if kind != "authentic":
            ok, buf = cv2.imencode(".png", mask * 255)
            write_bytes_atomic(out / "Gt" / f"{stem}.png", buf.tobytes())
            row[1] = f"Gt/{stem}.png"
        if side == "train":
            split = "train"
        elif kind == holdout_type:
            split = "holdout"
        else:
            split = "calibration" if is_calibration_photo(host_photo, root) else "test"
        lists[split].append(row)
        sources[row[0]] = host_photo.path.relative_to(root).as_posix()
        if progress:
            progress(i)
        i += 1
    for name, rows in lists.items():
        write_bytes_atomic(out / f"{name}.json", json.dumps(rows, indent=0).encode())
    write_bytes_atomic(out / "sources.json", json.dumps(sources, indent=0, sort_keys=True).encode())
    return {**{k: len(v) for k, v in lists.items()},
            "train_photos": len(sides["train"]), "eval_photos": len(sides["eval"])}
