"""Decoding within the memory bound for each format (issue 26, item 14): a huge PNG is reduced as it is decoded, a
progressive JPEG has its own limit (its decoder holds every coefficient), a JPEG's frame header is found past large
ICC/XMP segments, 16-bit RGBA is converted in strips, and the overlay is made at a bounded size."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from diffiml.runtime.errors import ImageDecodeError
from diffiml.runtime.image_io import (
    MAX_PIXELS,
    MAX_PROGRESSIVE_COEFFICIENT_BYTES,
    jpeg_frame,
    load_image,
)
from diffiml.runtime.outputs import MAX_OVERLAY_SIDE, heat_overlay


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _jpeg(image: np.ndarray, progressive: bool = False) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90,
                                        cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()


def _with_app_segments(jpeg: bytes, total: int) -> bytes:
    """The JPEG with APP2 segments (as an ICC profile would be) of ``total`` bytes between SOI and the rest."""
    segments = b""
    while total > 0:
        body = bytes(min(total, 65000))
        segments += b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body
        total -= len(body)
    return jpeg[:2] + segments + jpeg[2:]


def _claiming(jpeg: bytes, side: int) -> bytes:
    """The JPEG with its frame header claiming side x side pixels."""
    frame = bytearray(jpeg)
    sof = next(i for i in range(len(frame) - 1) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC2))
    frame[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(frame)


def test_a_frame_header_past_64_kib_of_metadata_is_found():
    image = _photo(48, 64)
    big = _with_app_segments(_jpeg(image), 200_000)
    assert big.find(b"\xff\xc0") > 1 << 16
    decoded = load_image(big)
    assert (decoded.width, decoded.height) == (64, 48)
    assert np.abs(decoded.rgb.astype(int) - load_image(_jpeg(image)).rgb).max() == 0
    frame = jpeg_frame(np.frombuffer(big, np.uint8))
    assert frame is not None and (frame.width, frame.height) == (64, 48)
    # and the progressive limit, which reads the frame header, still sees it there
    huge = _with_app_segments(_claiming(_jpeg(image, progressive=True), 24000), 200_000)
    with pytest.raises(ImageDecodeError, match="progressive JPEG"):
        load_image(huge, 512)


def test_the_frame_header_says_progressive_and_its_sampling():
    image = _photo(40, 56)
    baseline, progressive = (jpeg_frame(np.frombuffer(_jpeg(image, p), np.uint8)) for p in (False, True))
    assert baseline is not None and progressive is not None
    assert (baseline.width, baseline.height, baseline.progressive) == (56, 40, False)
    assert progressive.progressive and progressive.sampling == baseline.sampling
    assert baseline.sampling == ((2, 2), (1, 1), (1, 1))  # OpenCV's default 4:2:0


def test_a_progressive_jpeg_has_its_own_limit_a_baseline_one_of_the_same_size_does_not():
    """20000² progressive 4:2:0 holds 1.2 GB of coefficients, under the limit; 24000² (under MAX_PIXELS) does not."""
    small = _jpeg(_photo(48, 64), progressive=True)
    side = 24000
    assert side * side < MAX_PIXELS
    assert 2 * side * side * 1.5 > MAX_PROGRESSIVE_COEFFICIENT_BYTES
    with pytest.raises(ImageDecodeError, match="progressive JPEG"):
        load_image(_claiming(small, side), 512)
    baseline = _claiming(_jpeg(_photo(48, 64)), side)
    try:  # libjpeg may fill the missing data in, or refuse it; no limit refuses it
        load_image(baseline, 512)
    except ImageDecodeError as exc:
        assert "exceeds" not in str(exc)


def test_a_large_png_is_reduced_while_it_is_decoded():
    """A plain 8-bit PNG far larger than the model is decoded a strip at a time into a box-averaged reduction: the
    same picture as reducing the full decode with an area resize."""
    image = _photo(2048, 2560, seed=3)
    png = cv2.imencode(".png", image)[1].tobytes()
    decoded = load_image(png, 256)  # reduced 4x: min side 2048 // 8 >= 2 * 256
    assert (decoded.height, decoded.width) == (2048, 2560) and decoded.rgb.shape == (512, 640, 3)
    expected = cv2.resize(image, (640, 512), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.abs(decoded.rgb.astype(int) - expected).max() <= 1
    assert load_image(png).rgb.shape == (2048, 2560, 3)  # without a model size: whole


def test_sixteen_bit_rgba_is_converted_in_strips_to_the_top_byte():
    rng = np.random.default_rng(1)
    bgra = rng.integers(0, 65536, (300, 200, 4), dtype=np.uint16)
    bgra[..., 3] = 65535
    rgb = load_image(cv2.imencode(".png", bgra)[1].tobytes()).rgb
    assert rgb.flags["C_CONTIGUOUS"] and rgb.shape == (300, 200, 3)
    assert np.array_equal(rgb, (bgra[..., 2::-1] >> 8).astype(np.uint8))


def test_the_overlay_is_bounded_and_unchanged_below_the_bound():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    prob = rng.random((16, 16)).astype(np.float32)
    expected_prob = cv2.resize(prob, (90, 60), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((expected_prob * 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (0.5 * expected_prob)[..., None]
    expected = (rgb[..., ::-1] * (1 - weight) + heat * weight).astype(np.uint8)
    assert np.array_equal(heat_overlay(rgb, prob), expected)
    wide = np.zeros((100, MAX_OVERLAY_SIDE * 2, 3), np.uint8)
    assert heat_overlay(wide, prob).shape == (50, MAX_OVERLAY_SIDE, 3)


def test_a_huge_mask_is_thresholded_in_strips_like_the_exact_one(monkeypatch):
    """Above MAX_EXACT_MASK_PIXELS the mask never builds the full-size 16-bit map; it marks the same pixels but for
    a boundary pixel's rounding."""
    from diffiml.runtime import localizer as module

    rng = np.random.default_rng(0)
    small = cv2.GaussianBlur(rng.random((64, 64)).astype(np.float32), (0, 0), 3)
    small = (small - small.min()) / (small.max() - small.min())
    result = module.LocalizationResult(model_probability=small, model_uncertainty=None, height=777, width=1333,
                                       score=0.5)
    exact = result.mask
    monkeypatch.setattr(module, "MAX_EXACT_MASK_PIXELS", 1000)
    calls = []
    monkeypatch.setattr(module.LocalizationResult, "probability16", lambda self: calls.append(1))
    stripped = result.mask
    assert calls == [] and stripped.shape == exact.shape and stripped.dtype == bool
    assert 0.2 < exact.mean() < 0.8 and (stripped != exact).mean() < 1e-4


def _pillow_png(image: np.ndarray, **save) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_a_reduced_png_turned_by_exif_reports_its_turned_size():
    """Orientation 6 (a quarter turn): the reduced libvips decode and the whole OpenCV decode agree on the size."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    png = _pillow_png(_photo(64, 128, seed=5), exif=exif.tobytes())
    whole, reduced = load_image(png), load_image(png, 8)
    assert (whole.height, whole.width) == (128, 64) == whole.rgb.shape[:2]
    assert (reduced.height, reduced.width) == (128, 64)
    assert reduced.rgb.shape[0] > reduced.rgb.shape[1]


def test_a_reduced_png_with_a_transparent_colour_is_read_as_its_colour():
    image = _photo(256, 320, seed=6)
    png = _pillow_png(image, transparency=(0, 0, 0))  # a tRNS chunk: libvips adds an alpha band
    assert b"tRNS" in png
    reduced = load_image(png, 16)
    expected = cv2.resize(image, (reduced.rgb.shape[1], reduced.rgb.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.rgb.astype(int) - expected).max() <= 1
