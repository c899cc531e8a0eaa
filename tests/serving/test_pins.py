"""The serving environment (numpy < 2) runs the OpenCV that the main one does: localize and serve give the same
copy-move cue only then."""

import re
from pathlib import Path

import cv2


def test_opencv_is_the_pinned_version():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    pinned = re.search(r'"opencv-python-headless==([\d.]+)"', text).group(1)
    assert pinned.startswith(cv2.__version__ + "."), (cv2.__version__, pinned)
