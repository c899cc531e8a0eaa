"""A classical copy-move cue beside the score-based model: keypoints matched within the image, a geometric check,
then dense verification of the matched regions.

Why a classical cue: a region copied within one photo carries the photo's own noise, JPEG history and light, so the
traces the model reads for splices are absent; what gives a copy-move away is that two regions of the image match.
The model's encoder sees each position on its own, and a self-correlation stage trained on two CPU cores did not learn
to match (benchmarks/RESULTS.md, "Copy-moves"). Keypoint matching does, with no training (Amerini et al., TIFS 2011:
SIFT with the generalised 2-nearest-neighbour test; dense verification of each estimated transform by local
correlation, as in their 2013 localization step). The cue's map is fused with the model's by a pixel-wise max
(runtime/localizer.py), so it only ever adds regions it verified.

Steps: SIFT on the grey image (its descriptors also mirrored, by permuting their bins, so flipped copies match too);
g2NN ratio test within the image; pairs closer than ``min_distance`` dropped; affine transforms found one at a time
by RANSAC over the pairs (both directions); a transform is kept with ``min_inliers`` inlier pairs and a scale in
(0.5, 2); for each kept transform T, the image is compared with itself warped by T and by T⁻¹ (normalized cross-
correlation in 7×7 windows); where it correlates above ``ncc_threshold`` on textured pixels, in a connected region
that holds an inlier keypoint, both the source and the copy are marked, if the two regions' noise residuals agree
too.

Why the residual check: a repeated window, tile or leaf correlates with its neighbour as image content, but its
sensor noise and JPEG rounding are its own. A copied region carries its source's high-frequency residual pixel for
pixel (resampled with it when the copy was scaled or rotated). So each verified transform is kept only where the
residuals (image minus its 3×3 median) of the region and of its warped partner correlate above
``residual_threshold``, with the transform's translation refined within ±1 px (keypoint positions are not exact
enough for noise). The agreement is reported (``CopyMoveFinding.residual``) and feeds the image-level detector.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from diffiml.runtime.errors import BundleError

METHOD = "sift-g2nn-affine-ncc"
# Residual agreement beyond what natural repetitions reach: on the detector's fitting images (training photos only),
# 1.5 % of authentic images show more than 0.7, against 24 % of copy-moves. What lies above it is the detector's
# "near-exact copy" input, so a linear model can give a verified copy the weight it deserves.
EXACT_RESIDUAL = 0.7


@dataclass(frozen=True)
class CopyMoveCue:
    """The cue's settings, as a bundle's manifest records them (``copy_move_cue``). Chosen on a synthetic split
    (``diffiml bench copy-move-cue``), never on the real evaluation images: the copy-move F1 that keeps false alarms
    on authentic photos at or under about 5 % (benchmarks/RESULTS.md)."""

    max_side: int = 1024  # work on at most this many pixels on the long side (SIFT cost grows with the area)
    ratio: float = 0.5  # g2NN: accept the k-th neighbour while d_k / d_{k+1} < ratio
    neighbours: int = 10
    min_distance: float = 20.0  # pixels at the working size: nearer pairs are one structure, not a copy
    min_inliers: int = 4  # distinct keypoint pairs (each unordered pair counted once)
    max_transforms: int = 3
    ransac_pixels: float = 3.0
    ncc_threshold: float = 0.92
    min_variance: float = 4.0  # grey levels²: flat pixels correlate with anything
    min_region: float = 0.0005  # fraction of the image: smaller verified regions are dropped
    flips: bool = True
    max_keypoints: int = 4000
    contrast_threshold: float = 0.01  # SIFT's: lower finds keypoints in weaker texture (small, flat copies)
    residual_threshold: float = 0.2  # noise-residual correlation a copy must show (0: keep every verified region)

    def manifest(self) -> dict[str, Any]:
        return {"method": METHOD, **asdict(self)}

    @staticmethod
    def from_manifest(entry: Any, where: str) -> CopyMoveCue:
        """The manifest's ``copy_move_cue``; a bundle asking for another method or unknown settings is refused."""
        if not isinstance(entry, dict) or entry.get("method") != METHOD:
            raise BundleError(f"{where}: copy_move_cue must be an object with method {METHOD!r}")
        known = {f.name for f in fields(CopyMoveCue)}
        unknown = set(entry) - known - {"method"}
        if unknown:
            raise BundleError(f"{where}: copy_move_cue has settings this runtime does not know: {sorted(unknown)}")
        defaults, values = CopyMoveCue(), {}
        for f in fields(CopyMoveCue):
            default = getattr(defaults, f.name)
            # bundles written before the residual check had none: they keep their behaviour
            value = entry.get(f.name, 0.0 if f.name == "residual_threshold" else default)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            else:  # a number >= 0; an integer setting takes only whole numbers
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and (
                    isinstance(default, float) or float(value).is_integer())
            if not ok:
                kind = "boolean" if isinstance(default, bool) else f"{type(default).__name__} >= 0"
                raise BundleError(f"{where}: copy_move_cue.{f.name} must be a {kind}, got {value!r}")
            low = _MINIMUM.get(f.name)
            if low is not None and value < low:
                raise BundleError(f"{where}: copy_move_cue.{f.name} must be at least {low}, got {value!r}")
            values[f.name] = type(default)(value)
        return CopyMoveCue(**values)


# Settings below these make the cue fail on every image (0 neighbours, fewer inliers than an affine fit needs) or
# silently change its meaning (0 keypoints is OpenCV's "unlimited", a 0 px working size turns it off).
_MINIMUM = {"max_side": 32, "neighbours": 1, "min_inliers": 3, "max_transforms": 1, "max_keypoints": 16,
            "ratio": 1e-3, "ransac_pixels": 1e-3}


@dataclass
class CopyMoveFinding:
    """What the cue found in one image (the counts say why a mask is empty: no pairs, or none verified)."""

    mask: np.ndarray  # (h, w) uint8 0/1 at the working size: source and copies
    transforms: int  # copy transforms verified by content and by noise residual (0: nothing found)
    pairs: int  # distinct keypoint pairs that passed the ratio test
    residual: float = 0.0  # best noise-residual agreement of a content-verified region pair (0: none)
    candidates: int = 0  # transforms verified by content (before the residual check)
    candidate_fraction: float = 0.0  # share of the image their regions cover

    def evidence(self) -> dict[str, float]:
        """The detector's cue inputs: what content verification found and how well its best pair's noise agrees
        (independent of ``residual_threshold``, which only decides what the mask shows)."""
        return {"cue_area": self.candidate_fraction, "cue_transforms": float(self.candidates),
                "cue_residual": self.residual, "cue_exact": max(0.0, self.residual - EXACT_RESIDUAL),
                "cue_pairs": float(np.log1p(self.pairs))}


def _g2nn(query: np.ndarray, train: np.ndarray, ratio: float, k: int, same: bool) -> list[tuple[int, int]]:
    """(query index, train index) for every neighbour that passes the generalised 2NN test."""
    kk = min(k + int(same), len(train))
    out = []
    for i, matches in enumerate(cv2.BFMatcher(cv2.NORM_L2).knnMatch(query, train, k=kk)):
        if same:
            matches = [m for m in matches if m.trainIdx != i]
        for a, b in zip(matches, matches[1:], strict=False):
            if a.distance >= ratio * b.distance:
                break
            out.append((i, a.trainIdx))
    return out


# SIFT's descriptor is 4 x 4 cells (rows across the keypoint's orientation, columns along it) x 8 orientation bins.
# Mirroring the image mirrors each keypoint's orientation (angle -> 180 - angle), and in the keypoint's own frame the
# patch is reflected across its orientation axis: the cell rows reverse, and a gradient at relative angle phi lands at
# -phi (bin o -> -o mod 8). So the mirror image's descriptors are these columns of the image's own, with no second
# SIFT pass (tests/test_copy_move.py checks them against SIFT run on the mirror image).
MIRROR_BINS = np.arange(128).reshape(4, 4, 8)[::-1][:, :, (-np.arange(8)) % 8].reshape(-1)


def keypoint_pairs(gray: np.ndarray, cue: CopyMoveCue) -> np.ndarray:
    """(P, 2, 2) float32: matched keypoint positions (x, y) within the image, mirrored matches included."""
    sift = cv2.SIFT_create(nfeatures=cue.max_keypoints, contrastThreshold=cue.contrast_threshold)
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or len(keypoints) < 3:
        return np.zeros((0, 2, 2), np.float32)
    pts = np.float32([kp.pt for kp in keypoints])
    pairs = [(pts[i], pts[j]) for i, j in _g2nn(desc, desc, cue.ratio, cue.neighbours, same=True)]
    if cue.flips:  # SIFT descriptors are not mirror-invariant: match against the mirrored image's
        mirrored = desc[:, MIRROR_BINS]  # what SIFT computes on the mirror image at each keypoint's mirror
        pairs += [(pts[i], pts[j]) for i, j in _g2nn(desc, mirrored, cue.ratio, cue.neighbours, same=False)]
    if not pairs:
        return np.zeros((0, 2, 2), np.float32)
    arr = np.array(pairs, np.float32)
    arr = arr[np.hypot(*(arr[:, 0] - arr[:, 1]).T) >= cue.min_distance]
    return unique_pairs(arr)


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Each unordered pair once: g2NN from a finds b and from b finds a, and counting both would let
    ``min_inliers`` mean half of what it says."""
    if not len(pairs):
        return pairs
    swap = (pairs[:, 0, 0] > pairs[:, 1, 0]) | ((pairs[:, 0, 0] == pairs[:, 1, 0]) & (pairs[:, 0, 1] > pairs[:, 1, 1]))
    ordered = np.where(swap[:, None, None], pairs[:, ::-1], pairs)
    _, first = np.unique(np.round(ordered.reshape(len(pairs), 4) * 2), axis=0, return_index=True)
    return ordered[np.sort(first)]


def copy_transforms(pairs: np.ndarray, cue: CopyMoveCue) -> list[tuple[np.ndarray, np.ndarray]]:
    """Affine transforms (2×3, source -> copy) that explain at least ``min_inliers`` pairs, with their inlier
    points. Pairs enter in both directions: which end is the copy is unknown."""
    both = np.concatenate([pairs, pairs[:, ::-1]])
    open_pairs = np.ones(len(pairs), bool)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(cue.max_transforms + 2):  # a couple of rejected (degenerate) fits may come first
        if len(found) == cue.max_transforms:
            break
        idx = np.flatnonzero(np.concatenate([open_pairs, open_pairs]))
        if len(idx) < 2 * cue.min_inliers:
            break
        matrix, inliers = cv2.estimateAffine2D(both[idx, 0], both[idx, 1], ransacReprojThreshold=cue.ransac_pixels,
                                               maxIters=2000, confidence=0.99)
        if matrix is None:
            break
        chosen = idx[inliers.ravel().astype(bool)]
        explained = np.unique(chosen % len(pairs))
        if len(explained) < cue.min_inliers:
            break
        open_pairs[explained] = False
        scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
        if 0.5 < scale < 2.0:
            found.append((matrix, both[chosen].reshape(-1, 2)))
    return found


def _local_ncc(a: np.ndarray, b: np.ndarray, window: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Normalized cross-correlation of a and b in every window, and the smaller of the two local variances."""
    k = (window, window)
    ma, mb = cv2.blur(a, k), cv2.blur(b, k)
    va, vb = cv2.blur(a * a, k) - ma * ma, cv2.blur(b * b, k) - mb * mb
    cov = cv2.blur(a * b, k) - ma * mb
    return cov / np.sqrt(np.maximum(va * vb, 1e-6)), np.minimum(va, vb)


def noise_residual(gray: np.ndarray) -> np.ndarray:
    """float32: the image minus its 3×3 median, the high-frequency part a copy carries along and content does not
    explain."""
    return gray.astype(np.float32) - cv2.medianBlur(gray, 3).astype(np.float32)


def residual_agreement(residual: np.ndarray, region: np.ndarray, t: np.ndarray, search: float = 1.0) -> float:
    """How sharply the noise residual inside ``region`` agrees with the residual at the positions ``t`` maps them
    to: the best correlation over translations within ±``search`` px (half-pixel steps: RANSAC's transform is not
    exact enough for noise), minus the mean correlation 2 px away from that best alignment. Noise is white: a copy's
    residual agrees at one alignment only, while repeated content (edges, a facade's windows) still agrees when
    shifted. Computed on the region's bounding box only."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    inner = region[y0:y1, x0:x1].astype(bool)
    a = residual[y0:y1, x0:x1][inner].astype(np.float64)
    a -= a.mean()
    na = np.sqrt((a * a).sum())
    if na < 1e-6 or inner.sum() < 64:
        return 0.0
    base = t.astype(np.float64).copy()
    base[:, 2] += base[:, :2] @ np.array([x0, y0], np.float64)  # output pixel (0, 0) is the box's corner

    def correlation(dx: float, dy: float) -> float:
        shifted = base.copy()
        shifted[:, 2] += (dx, dy)
        warped = cv2.warpAffine(residual, shifted, (int(x1 - x0), int(y1 - y0)),
                                flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR)
        b = warped[inner].astype(np.float64)
        b -= b.mean()
        nb = np.sqrt((b * b).sum())
        return float((a * b).sum() / (na * nb)) if nb > 1e-6 else 0.0

    steps = np.arange(-search, search + 0.25, 0.5)
    best, bx, by = max((correlation(dx, dy), dx, dy) for dy in steps for dx in steps)
    ring = [correlation(bx + 2 * np.cos(a), by + 2 * np.sin(a)) for a in np.arange(8) * np.pi / 4]
    return max(best - float(np.mean(ring)), 0.0)


def verify_regions(gray: np.ndarray, transforms: list[tuple[np.ndarray, np.ndarray]], cue: CopyMoveCue
                   ) -> CopyMoveFinding:
    """(h, w) uint8 0/1: pixels that correlate with their image under a found transform (or its inverse), in
    connected regions that hold one of its inlier keypoints, for the transforms whose regions' noise residuals agree
    with their partners'; with what content verification found before that check."""
    h, w = gray.shape
    g = cv2.GaussianBlur(gray, (3, 3), 0).astype(np.float32)
    residual = noise_residual(gray)
    out, content = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    kept, candidates, best = 0, 0, 0.0
    for matrix, points in transforms:
        xy = np.round(points).astype(int)
        xy = xy[(xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)]
        regions, agreement = [], 0.0
        for t in (matrix, cv2.invertAffineTransform(matrix)):
            # WARP_INVERSE_MAP: warped(x) = g(t x), the pixel this one would have been copied to (or from)
            warped = cv2.warpAffine(g, t, (w, h), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR)
            inside = cv2.warpAffine(np.ones_like(g), t, (w, h), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST) > 0
            ncc, variance = _local_ncc(g, warped)
            hits = ((ncc > cue.ncc_threshold) & (variance > cue.min_variance) & inside).astype(np.uint8)
            hits = cv2.morphologyEx(hits, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
            hits = cv2.morphologyEx(hits, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
            count, labels, stats, _ = cv2.connectedComponentsWithStats(hits)
            keep = np.zeros(count, bool)
            keep[labels[xy[:, 1], xy[:, 0]]] = True
            keep[0] = False
            keep &= stats[:, cv2.CC_STAT_AREA] >= cue.min_region * h * w
            region = keep[labels].astype(np.uint8)
            if region.any():
                regions.append(region)
                agreement = max(agreement, residual_agreement(residual, region, t))
        if not regions:
            continue
        best, candidates = max(best, agreement), candidates + 1
        for region in regions:
            content |= region
            if agreement >= cue.residual_threshold:
                out |= region
        kept += int(agreement >= cue.residual_threshold)
    mask = cv2.morphologyEx(out, cv2.MORPH_CLOSE, np.ones((15, 15), np.uint8))  # flat holes inside a copy
    return CopyMoveFinding(mask, kept, 0, best, candidates, float(content.mean()))


def find_copy_moves(rgb: np.ndarray, cue: CopyMoveCue) -> CopyMoveFinding:
    """The cue on one RGB (or grey) uint8 image; the mask is at the working size (long side at most
    ``cue.max_side``)."""
    h0, w0 = rgb.shape[:2]
    s = min(1.0, cue.max_side / max(h0, w0))
    small = cv2.resize(rgb, (max(1, round(w0 * s)), max(1, round(h0 * s))), interpolation=cv2.INTER_AREA) \
        if s < 1 else rgb
    gray = np.ascontiguousarray(small) if small.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(small),
                                                                            cv2.COLOR_RGB2GRAY)
    pairs = keypoint_pairs(gray, cue)
    transforms = copy_transforms(pairs, cue) if len(pairs) else []
    if not transforms:
        return CopyMoveFinding(np.zeros(gray.shape, np.uint8), 0, len(pairs))
    return replace(verify_regions(gray, transforms, cue), pairs=len(pairs))


def copy_move_probability(rgb: np.ndarray, cue: CopyMoveCue, size: int
                          ) -> tuple[np.ndarray, CopyMoveFinding, float]:
    """(size, size) float32 in [0, 1]: the cue's mask at the model's resolution (area-averaged, so a thin region
    keeps its share), what it found, and the seconds it took."""
    t0 = time.perf_counter()
    finding = find_copy_moves(rgb, cue)
    prob = cv2.resize(finding.mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return prob, finding, time.perf_counter() - t0
