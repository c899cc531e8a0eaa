"""Tampering edge map of eq. 7: dilate(Canny(mask))."""

from __future__ import annotations

import cv2
import numpy as np

from diffiml.constants import EDGE_WIDTH


def edge_map(mask: np.ndarray, width: int = EDGE_WIDTH) -> np.ndarray:
    """{0,1} mask (H, W) -> {0,1} edge band of about ``width`` pixels (H, W) uint8."""
    canny = cv2.Canny((mask > 0).astype(np.uint8) * 255, 50, 150)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (width, width))
    return (cv2.dilate(canny, kernel) > 0).astype(np.uint8)
