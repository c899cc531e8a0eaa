"""Training augmentation of paper 4.3 (after MVSS-Net): flips, blur, JPEG compression, and naive manipulations
(crop-and-paste a square, OpenCV inpainting) that also extend the mask."""

from __future__ import annotations

import cv2
import numpy as np


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy() if ok else image


def paste_square(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Copy a random square of the image onto another place; the pasted square becomes manipulated."""
    h, w = mask.shape
    s = int(rng.integers(max(4, min(h, w) // 10), max(5, min(h, w) // 4)))
    y0, x0, y1, x1 = (int(rng.integers(0, max(1, n - s))) for n in (h, w, h, w))
    image[y1 : y1 + s, x1 : x1 + s] = image[y0 : y0 + s, x0 : x0 + s].copy()
    mask[y1 : y1 + s, x1 : x1 + s] = 1


def inpaint_blob(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Remove a random ellipse with OpenCV inpainting; the inpainted area becomes manipulated."""
    h, w = mask.shape
    region = np.zeros((h, w), np.uint8)
    center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
    axes = (int(rng.integers(3, max(4, w // 8))), int(rng.integers(3, max(4, h // 8))))
    cv2.ellipse(region, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    mask[region > 0] = 1
    return cv2.inpaint(np.ascontiguousarray(image), region, 3, method)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, inpaint: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB and (H, W) {0,1} mask -> augmented copies. ``inpaint=False`` keeps removal by
    inpainting out of training, so that a held-out inpainting set stays unseen."""
    image, mask = image.copy(), mask.copy()
    if rng.random() < 0.5:
        image, mask = image[:, ::-1].copy(), mask[:, ::-1].copy()
    if rng.random() < 0.1:
        paste_square(image, mask, rng)
    if rng.random() < 0.1 and inpaint:
        image = inpaint_blob(image, mask, rng)
    if rng.random() < 0.2:
        k = int(rng.choice([3, 5]))
        image = cv2.GaussianBlur(image, (k, k), 0)
    if rng.random() < 0.3:
        image = jpeg(image, int(rng.integers(60, 100)))
    return image, mask
