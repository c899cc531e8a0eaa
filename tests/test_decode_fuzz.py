"""The decoder under hostile input: truncations, bit flips and lying headers over every common format never give a
traceback (only ImageDecodeError) and never go over the memory bound."""

import json
import struct
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from diffiml.runtime.errors import ImageDecodeError
from diffiml.runtime.image_io import load_image

FORMATS = (".png", ".jpg", ".tiff", ".bmp", ".webp", ".ppm")


def _encoded(suffix: str) -> bytes:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (0, 0), 1.0)
    ok, buf = cv2.imencode(suffix, image)
    assert ok
    return buf.tobytes()


def lying_headers(side: int = 60000) -> dict[str, bytes]:
    """Small files whose headers claim side x side pixels (by default 60000: 3.6 G), one per format."""
    bmp = bytearray(_encoded(".bmp"))
    bmp[18:26] = struct.pack("<ii", side, side)
    png = bytearray(_encoded(".png"))
    png[16:24] = struct.pack(">II", side, side)  # IHDR (its CRC now wrong too)
    ppm = f"P6\n{side} {side}\n255\n".encode() + bytes(300)
    jpg = bytearray(_encoded(".jpg"))
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    tiff = bytearray(_encoded(".tiff"))
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for i in range(count):  # ImageWidth (256) and ImageLength (257) entries
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack(order + "HH", tiff[at : at + 4])
        if tag in (256, 257):
            value = struct.pack(order + ("H" if kind == 3 else "I"), side)
            tiff[at + 8 : at + 8 + len(value)] = value
    webp = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4) + \
        (side - 1).to_bytes(3, "little") + (side - 1).to_bytes(3, "little")
    return {"bmp": bytes(bmp), "png": bytes(png), "ppm": ppm, "jpg": bytes(jpg), "tiff": bytes(tiff), "webp": webp}


def mutants(seed: int = 0, flips: int = 12) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = [(f"lying {k}", v) for k, v in lying_headers().items()]
    for suffix in FORMATS:
        data = _encoded(suffix)
        for cut in (1, 8, 16, 33, len(data) // 3, len(data) // 2, len(data) - 1):
            out.append((f"{suffix} cut at {cut}", data[:cut]))
        for i in range(flips):
            flipped = bytearray(data)
            for at in rng.integers(0, min(len(data), 512 if i % 2 else len(data)), size=1 + i % 4):
                flipped[int(at)] ^= 1 << int(rng.integers(8))
            out.append((f"{suffix} flip {i}", bytes(flipped)))
    return out


@pytest.mark.parametrize("kind", sorted(lying_headers()))
def test_a_header_that_lies_about_its_size_is_refused_before_decoding(kind):
    with pytest.raises(ImageDecodeError, match=r"pixels|not an image|not a decodable"):
        load_image(lying_headers()[kind])


def test_every_format_still_decodes():
    for suffix in FORMATS:
        assert load_image(_encoded(suffix)).rgb.shape == (48, 64, 3), suffix


def test_fuzzed_inputs_raise_only_image_decode_errors_and_stay_under_the_memory_bound():
    """In a fresh process, so its peak resident memory is the decoder's alone."""
    script = textwrap.dedent("""
        import json, re, sys
        sys.path.insert(0, sys.argv[1])
        from test_decode_fuzz import mutants
        from diffiml.runtime.errors import ImageDecodeError
        from diffiml.runtime.image_io import load_image
        decoded = refused = 0
        other = []
        for name, data in mutants():
            try:
                load_image(data)
                decoded += 1
            except ImageDecodeError as exc:
                assert "\\n" not in str(exc), name
                refused += 1
            except BaseException as exc:  # anything else is the bug this test is for
                other.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the parent's size
        status = open("/proc/self/status").read()
        peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
        print(json.dumps({"decoded": decoded, "refused": refused, "other": other, "peak_mib": peak}))
    """)
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", script, tests_dir], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["other"] == []
    assert result["refused"] > len(lying_headers()) and result["decoded"] > 0  # both outcomes were exercised
    assert result["peak_mib"] < 2048


@pytest.mark.parametrize("kind", ["bmp", "tiff", "ppm", "png16"])  # (webp: a bare VP8X header has no readable size)
def test_formats_decoded_whole_have_their_own_pixel_limit(kind: str) -> None:
    """Headers under MAX_PIXELS but over what a format decoded at full size may claim (12000² = 144 MP) are refused
    by that limit, before any decoding; a JPEG of the same claim passes it (it is decoded reduced)."""
    from diffiml.runtime.image_io import MAX_FULL_DECODE_PIXELS, MAX_PIXELS

    side = 12000
    assert MAX_FULL_DECODE_PIXELS < side * side < MAX_PIXELS
    headers = lying_headers(side)
    if kind == "png16":  # a 16-bit PNG is decoded whole
        png = bytearray(headers["png"])
        png[24] = 16
        data = bytes(png)
    else:
        data = headers[kind]
    with pytest.raises(ImageDecodeError, match="for this format"):
        load_image(data)
    try:  # libjpeg may fill the missing data in, or refuse it; the pixel limit does not refuse it
        load_image(headers["jpg"], 256)
    except ImageDecodeError as exc:
        assert "exceeds" not in str(exc)
