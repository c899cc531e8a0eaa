"""A classical copy-move cue beside the score-based model: keypoints matched within the image, a geometric check,
then dense verification of the matched regions.

Why a classical cue: a region copied within one photo carries the photo's own noise, JPEG history and light, so the
traces the model reads for splices are absent; what gives a copy-move away is that two regions of the image match.
The model's encoder sees each position on its own, and a self-correlation stage trained on two CPU cores did not learn
to match (benchmarks/RESULTS.md, "Copy-moves"). Keypoint matching does, with no training (Amerini et al., TIFS 2011:
SIFT with the generalised 2-nearest-neighbour test; dense verification of each estimated transform by local
correlation, as in their 2013 localization step). The cue's map is fused with the model's by a pixel-wise max
(runtime/localizer.py), so it only ever adds regions it verified.

Steps: SIFT on the grey image (and on its mirror image, so flipped copies match too); g2NN ratio test within the
image; pairs closer than ``min_distance`` dropped; affine transforms found one at a time by RANSAC over the pairs
(both directions); a transform is kept with ``min_inliers`` inlier pairs and a scale in (0.5, 2); for each kept
transform T, the image is compared with itself warped by T and by T⁻¹ (normalized cross-correlation in 7×7 windows);
where it correlates above ``ncc_threshold`` on textured pixels, in a connected region that holds an inlier keypoint,
both the source and the copy are marked.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

from diffiml.runtime.errors import BundleError

METHOD = "sift-g2nn-affine-ncc"


@dataclass(frozen=True)
class CopyMoveCue:
    """The cue's settings, as a bundle's manifest records them (``copy_move_cue``). Chosen on a synthetic split
    (``diffiml bench copy-move-cue``), never on the real evaluation images: the copy-move F1 that keeps false alarms
    on authentic photos at or under about 5 % (benchmarks/RESULTS.md)."""

    max_side: int = 1024  # work on at most this many pixels on the long side (SIFT cost grows with the area)
    ratio: float = 0.5  # g2NN: accept the k-th neighbour while d_k / d_{k+1} < ratio
    neighbours: int = 10
    min_distance: float = 20.0  # pixels at the working size: nearer pairs are one structure, not a copy
    min_inliers: int = 6
    max_transforms: int = 3
    ransac_pixels: float = 3.0
    ncc_threshold: float = 0.92
    min_variance: float = 4.0  # grey levels²: flat pixels correlate with anything
    min_region: float = 0.0005  # fraction of the image: smaller verified regions are dropped
    flips: bool = True
    max_keypoints: int = 4000
    contrast_threshold: float = 0.01  # SIFT's: lower finds keypoints in weaker texture (small, flat copies)

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
            value = entry.get(f.name, default)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            else:  # a number >= 0; an integer setting takes only whole numbers
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 and (
                    isinstance(default, float) or float(value).is_integer())
            if not ok:
                kind = "boolean" if isinstance(default, bool) else f"{type(default).__name__} >= 0"
                raise BundleError(f"{where}: copy_move_cue.{f.name} must be a {kind}, got {value!r}")
            values[f.name] = type(default)(value)
        return CopyMoveCue(**values)


@dataclass
class CopyMoveFinding:
    """What the cue found in one image (the counts say why a mask is empty: no pairs, or none verified)."""

    mask: np.ndarray  # (h, w) uint8 0/1 at the working size: source and copies
    transforms: int  # verified copy transforms (0: nothing found)
    pairs: int  # keypoint pairs that passed the ratio test


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


def keypoint_pairs(gray: np.ndarray, cue: CopyMoveCue) -> np.ndarray:
    """(P, 2, 2) float32: matched keypoint positions (x, y) within the image, mirrored matches included."""
    sift = cv2.SIFT_create(nfeatures=cue.max_keypoints, contrastThreshold=cue.contrast_threshold)
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or len(keypoints) < 3:
        return np.zeros((0, 2, 2), np.float32)
    pts = np.float32([kp.pt for kp in keypoints])
    pairs = [(pts[i], pts[j]) for i, j in _g2nn(desc, desc, cue.ratio, cue.neighbours, same=True)]
    if cue.flips:  # SIFT descriptors are not mirror-invariant: match against the mirrored image's
        mirrored, mdesc = sift.detectAndCompute(np.ascontiguousarray(gray[:, ::-1]), None)
        if mdesc is not None and len(mirrored) >= 3:
            mpts = np.float32([kp.pt for kp in mirrored])
            mpts[:, 0] = gray.shape[1] - 1 - mpts[:, 0]
            pairs += [(pts[i], mpts[j]) for i, j in _g2nn(desc, mdesc, cue.ratio, cue.neighbours, same=False)]
    if not pairs:
        return np.zeros((0, 2, 2), np.float32)
    arr = np.array(pairs, np.float32)
    return arr[np.hypot(*(arr[:, 0] - arr[:, 1]).T) >= cue.min_distance]


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


def verify_regions(gray: np.ndarray, transforms: list[tuple[np.ndarray, np.ndarray]], cue: CopyMoveCue
                   ) -> np.ndarray:
    """(h, w) uint8 0/1: pixels that correlate with their image under a found transform (or its inverse), in
    connected regions that hold one of its inlier keypoints."""
    h, w = gray.shape
    g = cv2.GaussianBlur(gray, (3, 3), 0).astype(np.float32)
    out = np.zeros((h, w), np.uint8)
    for matrix, points in transforms:
        xy = np.round(points).astype(int)
        xy = xy[(xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)]
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
            out |= keep[labels].astype(np.uint8)
    return cv2.morphologyEx(out, cv2.MORPH_CLOSE, np.ones((15, 15), np.uint8))  # flat holes inside a copy


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
    mask = verify_regions(gray, transforms, cue) if transforms else np.zeros(gray.shape, np.uint8)
    return CopyMoveFinding(mask, len(transforms), len(pairs))


def copy_move_probability(rgb: np.ndarray, cue: CopyMoveCue, size: int) -> tuple[np.ndarray, float]:
    """(size, size) float32 in [0, 1]: the cue's mask at the model's resolution (area-averaged, so a thin region
    keeps its share), and the seconds it took."""
    t0 = time.perf_counter()
    finding = find_copy_moves(rgb, cue)
    prob = cv2.resize(finding.mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return prob, time.perf_counter() - t0
