"""Image decoding and pre/post-processing for the runtime: numpy + OpenCV only.

Any input becomes (H, W, 3) uint8 RGB at its original size: a path, bytes, or an array (gray, RGB, RGBA;
uint8 or uint16). OpenCV applies the EXIF orientation when decoding and converts CMYK JPEGs to BGR.

Nothing is decoded before its size is known: PNG and JPEG headers are read here, every other format's by Pillow
(which reads headers lazily); an input whose size cannot be read, or that is too large to decode within the memory
bound, is refused first. Any decoder's failure becomes an ``ImageDecodeError`` naming the input.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error

import cv2
import numpy as np

from diffiml.runtime.errors import ImageDecodeError, one_line

# Documented limits: inputs beyond these many pixels are refused before decoding (a decompression-bomb guard).
# JPEG and 8-bit PNG are decoded at a reduced size when large; every other format is decoded whole, so its limit is
# what fits the memory bound (100 MP of 16-bit RGBA is 800 MB before conversion).
MAX_PIXELS = 25_000 * 25_000
MAX_FULL_DECODE_PIXELS = 100_000_000
# A progressive JPEG keeps every DCT coefficient while it decodes, at any output scale: 2 bytes per pixel and
# component (a 20000² 4:4:4 image holds 2.4 GB). Its limit is on those bytes, from the frame header.
MAX_PROGRESSIVE_COEFFICIENT_BYTES = 1_250_000_000
MAX_BYTES = 1 << 30
ImageInput = str | os.PathLike | bytes | np.ndarray


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header (SOF) says: its size, whether it is progressive, its components' sampling."""

    width: int
    height: int
    progressive: bool
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) per component

    def coefficient_bytes(self) -> int:
        """What libjpeg holds for a progressive image whatever the output scale: every component's DCT
        coefficients (2 bytes each, one per pixel of the component's subsampled plane)."""
        h_max = max((h for h, _ in self.sampling), default=1) or 1
        v_max = max((v for _, v in self.sampling), default=1) or 1
        return sum(2 * -(-self.width * h // h_max) * -(-self.height * v // v_max) for h, v in self.sampling)


def jpeg_frame(data: np.ndarray) -> JpegFrame | None:
    """The frame header of a JPEG, found by walking its marker segments over the whole file (ICC profiles and XMP
    may put it far past the first 64 KiB), reading a few bytes per segment; None when it is not there."""
    at, end = 2, data.size
    while at + 9 < end:
        head = data[at : at + 4].tobytes()
        if head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        length = int.from_bytes(head[2:4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            body = data[at + 4 : at + 2 + length].tobytes()
            if len(body) < 6:
                return None
            count = body[5]
            sampling = tuple((body[7 + 3 * c] >> 4, body[7 + 3 * c] & 15) for c in range(count)
                             if 8 + 3 * c <= len(body))
            return JpegFrame(int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"),
                             marker in (0xC2, 0xC6, 0xCA, 0xCE), sampling)
        if marker in (0xDA, 0xD9) or length < 2:  # scan data before any frame header: not a JPEG we can size
            return None
        at += 2 + length
    return None


def _png_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, without decoding the pixels."""
    raw = data[:24].tobytes()
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) >= 24:
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    return None


def _pillow_size(source: str | bytes, name: str) -> tuple[int, int] | None:
    """(width, height) from any header Pillow reads (BMP, TIFF, WebP, PNM, GIF, ...), without decoding pixels.
    ``source``: the file's path (Pillow reads only what the header needs) or the encoded bytes (not copied)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: too many pixels to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct_error):
        return None


def _decode(data: np.ndarray, flag: int, name: str) -> np.ndarray:
    """cv2.imdecode whose every failure (None, cv2.error, memory) is an ImageDecodeError naming the input."""
    try:
        decoded = cv2.imdecode(data, flag)
    except (cv2.error, MemoryError, OverflowError) as exc:
        reason = one_line(exc, last=True)
        raise ImageDecodeError(f"{name}: not a decodable image ({reason[:200]})") from None
    if decoded is None or decoded.size == 0:
        raise ImageDecodeError(f"{name}: not a decodable image (corrupt, truncated or unsupported format)")
    return decoded


def png_significant_bits(data: np.ndarray | bytes) -> int | None:
    """The largest per-channel depth a PNG's sBIT chunk declares (e.g. 12 for 12-bit data stored in 16-bit samples),
    or None: not a PNG, or no sBIT before the image data."""
    raw = bytes(data[:1 << 16])
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    at = 8
    while at + 8 <= len(raw):
        length, kind = int.from_bytes(raw[at : at + 4], "big"), raw[at + 4 : at + 8]
        if kind == b"sBIT":
            body = raw[at + 8 : at + 8 + length]
            return max(body) if body and 1 <= max(body) <= 16 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        at += 12 + length
    return None


def sample_bits(a: np.ndarray, declared: int | None = None) -> int:
    """How many of a uint16 image's bits carry data: the file's own declaration (sBIT), else the smallest of 8, 10,
    12, 14 and 16 that holds its largest value, so 10- and 12-bit camera and scanner data are not read as nearly
    black (``>> 8`` maps 0-4095 to 0-15). A declared depth the values exceed means samples scaled up to 16 bits, as
    the PNG specification has writers store them: their top byte is right."""
    top = int(a.max()) if a.size else 0
    if declared:
        return declared if top < (1 << declared) else 16
    return next(b for b in (8, 10, 12, 14, 16) if top < (1 << b))


def _uint16_to_8(a: np.ndarray, bits: int) -> np.ndarray:
    """uint16 samples of ``bits`` significant bits -> uint8 full range, rounded (16 bits: the top byte); in strips of
    rows, so a 100 MP image never holds a wider copy than a strip. The 3-channel result is contiguous."""
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    out = np.empty(a.shape, np.uint8)
    top = (1 << bits) - 1
    step = max(1, (1 << 22) // max(1, a[0].size))
    for y in range(0, a.shape[0], step):
        if bits == 16:
            out[y : y + step] = a[y : y + step] >> 8
            continue
        strip = a[y : y + step].astype(np.uint32)
        np.minimum(strip, top, out=strip)
        out[y : y + step] = (strip * 255 + top // 2) // top
    return out


def to_rgb8(array: np.ndarray, name: str = "array", bits: int = 16) -> np.ndarray:
    """Gray / RGB / RGBA, uint8 / uint16 / float in [0, 1] -> (H, W, 3) uint8 RGB. ``bits``: the significant bits of
    uint16 samples (``sample_bits``); 16, the default for arrays, keeps the top byte."""
    a = np.asarray(array)
    if a.size == 0 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageDecodeError(f"{name}: expected an HxW or HxWxC (C = 1, 3, 4) image, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = _uint16_to_8(a, bits)
    elif a.dtype.kind == "f":
        a = (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageDecodeError(f"{name}: unsupported pixel type {a.dtype}; use uint8, uint16 or float")
    if a.ndim == 2 or a.shape[2] == 1:
        return np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # (h, w, 3) uint8; h, w may be a power-of-two reduction of the original for huge inputs
    height: int  # original size, after EXIF orientation
    width: int


def _png_is_plain_rgb8(data: np.ndarray) -> bool:
    raw = data[:32].tobytes()
    return len(raw) >= 26 and raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[24] == 8 and raw[25] == 2


def _checked_file(source: str | os.PathLike) -> Path:
    path = Path(source)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    if path.stat().st_size > MAX_BYTES:
        raise ImageDecodeError(f"{path}: file larger than {MAX_BYTES >> 20} MiB")
    return path


def read_image_file(source: str | os.PathLike) -> bytes:
    """A file's encoded bytes, with ``load_image``'s file checks (missing, larger than MAX_BYTES): what a client
    sends to a server, which decodes it."""
    return _checked_file(source).read_bytes()


def load_image(source: ImageInput, model_size: int | None = None) -> DecodedImage:
    """Decode at the original size, or raise ImageDecodeError naming the input.

    With ``model_size``, a JPEG or plain 8-bit PNG much larger than the model is decoded at 1/2, 1/4 or 1/8 of its
    size (libjpeg's DCT scaling for JPEG), so a 20000x20000 input never holds its full-size pixels in memory.
    """
    if isinstance(source, np.ndarray):
        rgb = to_rgb8(source)
        return DecodedImage(rgb, rgb.shape[0], rgb.shape[1])
    if isinstance(source, bytes | bytearray):
        if len(source) > MAX_BYTES:
            raise ImageDecodeError(f"<bytes>: larger than {MAX_BYTES >> 20} MiB")
        raw = bytes(source)  # a bytes object is not copied; a bytearray is, once
        name, data, header = "<bytes>", np.frombuffer(raw, np.uint8), raw
    else:
        name = header = str(_checked_file(source))
        data = np.fromfile(name, np.uint8)
    if data.size == 0:
        raise ImageDecodeError(f"{name}: empty file")
    is_jpeg = data[:2].tobytes() == b"\xff\xd8"
    reducible = is_jpeg or _png_is_plain_rgb8(data)
    frame = jpeg_frame(data) if is_jpeg else None
    size = ((frame.width, frame.height) if frame else _png_size(data)) or _pillow_size(header, name)
    if size is None:
        raise ImageDecodeError(f"{name}: not a decodable image (corrupt, truncated or unsupported format: its size "
                               "could not be read before decoding)")
    limit = MAX_PIXELS if reducible else MAX_FULL_DECODE_PIXELS
    if size[0] * size[1] > limit:
        raise ImageDecodeError(f"{name}: {size[0]}x{size[1]} pixels exceeds the limit of {limit:,} pixels"
                               + ("" if reducible else " for this format (JPEG and 8-bit PNG may be larger)"))
    if frame is not None and frame.progressive and frame.coefficient_bytes() > MAX_PROGRESSIVE_COEFFICIENT_BYTES:
        raise ImageDecodeError(
            f"{name}: {size[0]}x{size[1]} pixels exceeds the limit for a progressive JPEG (its decoder holds "
            f"{frame.coefficient_bytes() / 2**30:.1f} GiB of coefficients; at most "
            f"{MAX_PROGRESSIVE_COEFFICIENT_BYTES / 2**30:.2f} GiB): re-encode it as a baseline JPEG")
    if reducible:
        # 8-bit color: IMREAD_COLOR applies the EXIF orientation and turns CMYK JPEGs into BGR.
        reduce = 1
        if model_size:
            while reduce < 8 and min(size) // (2 * reduce) >= 2 * model_size:
                reduce *= 2
        if reduce > 1 and not is_jpeg:  # OpenCV would decode a PNG whole, then reduce it
            rgb = _png_shrunk(data, reduce, name)
        else:
            flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                    8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
            rgb = cv2.cvtColor(_decode(data, flag, name), cv2.COLOR_BGR2RGB)
        if reduce == 1:
            return DecodedImage(rgb, rgb.shape[0], rgb.shape[1])
        # An EXIF rotation swaps the header's width and height; follow the decoded aspect.
        w, h = size if (rgb.shape[1] >= rgb.shape[0]) == (size[0] >= size[1]) else size[::-1]
        return DecodedImage(rgb, h, w)
    decoded = _decode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH, name)
    if decoded.ndim == 3 and decoded.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(f"{name}: unsupported pixel layout ({decoded.shape[2]} channels)")
    color = decoded[..., :3] if decoded.ndim == 3 else decoded  # an opaque alpha channel is all ones
    bits = sample_bits(color, png_significant_bits(data)) if decoded.dtype == np.uint16 else 16
    if decoded.ndim == 3 and decoded.shape[2] >= 3:
        color = color[..., ::-1]  # OpenCV's BGR; reordered in to_rgb8's strips, never as a full-size copy
    rgb = to_rgb8(color, name, bits)
    return DecodedImage(rgb, rgb.shape[0], rgb.shape[1])


def _png_shrunk(data: np.ndarray, reduce: int, name: str) -> np.ndarray:
    """An 8-bit RGB PNG decoded a strip of rows at a time and averaged over ``reduce`` x ``reduce`` blocks as it
    goes (libvips, sequential access): a 25000 x 25000 PNG never holds its 1.75 GiB of full-size pixels, only the
    reduced image and a few strips (0.11 GiB at 12000², where OpenCV's reduced read peaks at 0.45 GiB). A box
    average, like the area resize the model's input gets. An EXIF orientation is applied to the reduced image."""
    import pyvips

    try:
        source = pyvips.Source.new_from_memory(data)  # the encoded bytes already read, not copied
        image = pyvips.Image.new_from_source(source, "", access="sequential", fail=True)
        if image.bands == 4:  # a tRNS chunk gives an RGB PNG an alpha band; the colour is what the model reads
            image = image.extract_band(0, n=3)
        if image.bands != 3 or image.format != "uchar":
            raise ImageDecodeError(f"{name}: not a decodable image (unexpected PNG layout)")
        small = image.shrink(reduce, reduce)
        if "orientation" in image.get_fields() and image.get("orientation") != 1:
            small = small.copy_memory().autorot()
        pixels = small.write_to_memory()
    except pyvips.Error as exc:
        reason = one_line(exc, last=True)
        raise ImageDecodeError(f"{name}: not a decodable image ({reason[:200]})") from None
    return np.frombuffer(pixels, np.uint8).reshape(small.height, small.width, 3).copy()


def preprocess(images: list[np.ndarray], size: int, mean: list[float], std: list[float], scale: float = 1 / 255
               ) -> np.ndarray:
    """RGB uint8 images of any size -> (B, 3, size, size) float32 NCHW: area resize (as in training), x ``scale``,
    then mean and std (the bundle's ``input``). A 20000x20000 input is downscaled here, so the model never sees
    more than size x size."""
    out = np.empty((len(images), 3, size, size), np.float32)
    scale = np.float32(scale)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    for i, img in enumerate(images):
        small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        out[i] = (small.transpose(2, 0, 1).astype(np.float32) * scale - m) / s
    return out


def resize_probability(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """(S, S) float32 -> (height, width) float32, bilinear: the mask comes back at the input's original size."""
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
