"""10- and 12-bit data in 16-bit files are scaled by their real range (issue: they decoded almost black)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from diffiml.runtime.image_io import load_image, png_significant_bits


def _png16(values: np.ndarray) -> bytes:
    return cv2.imencode(".png", values.astype(np.uint16))[1].tobytes()


def _with_sbit(png: bytes, bits: int, channels: int = 3) -> bytes:
    """The PNG with an sBIT chunk after its IHDR (8-byte signature + 25-byte IHDR chunk)."""
    body = b"sBIT" + bytes([bits] * channels)
    chunk = struct.pack(">I", channels) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]


def test_twelve_bit_data_fills_the_eight_bit_range():
    ramp = np.linspace(0, 4095, 64 * 48 * 3).reshape(48, 64, 3)
    rgb = load_image(_png16(ramp)).rgb
    assert rgb.max() == 255 and rgb.min() == 0
    expected = np.round(ramp[..., ::-1] * 255 / 4095)  # OpenCV writes BGR
    assert np.abs(rgb.astype(int) - expected).max() <= 1


def test_the_sbit_chunk_wins_over_the_data_range():
    dark = np.full((32, 32, 3), 1000)  # a dark 12-bit image: its range alone would say 10 bits
    png = _with_sbit(_png16(dark), 12)
    assert png_significant_bits(png) == 12
    assert load_image(png).rgb.max() == round(1000 * 255 / 4095)


def test_full_sixteen_bit_data_keeps_its_top_byte():
    full = np.full((16, 16, 3), 60000)
    assert load_image(_png16(full)).rgb.max() == 60000 >> 8


def test_an_opaque_alpha_channel_does_not_hide_the_colour_depth():
    rgba = np.dstack([np.full((16, 16, 3), 4095), np.full((16, 16), 65535)])  # 12-bit colour, 16-bit opaque alpha
    assert load_image(_png16(rgba)).rgb.max() == 255


def test_samples_scaled_to_sixteen_bits_as_the_png_specification_asks_keep_their_top_byte():
    """sBIT 12 over values that use all 16 bits (each 12-bit value v stored as v << 4 | v >> 8): the top byte is
    right, and scaling them as 12-bit values would saturate nearly every pixel."""
    v12 = np.linspace(0, 4095, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint16)
    stored = (v12 << 4) | (v12 >> 8)
    rgb = load_image(_with_sbit(_png16(stored), 12)).rgb
    assert np.array_equal(rgb, (stored[..., ::-1] >> 8).astype(np.uint8))
