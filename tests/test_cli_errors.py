"""A user's mistake on the command line is one line on stderr and a non-zero exit, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffiml.cli", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(done: subprocess.CompletedProcess, command: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"diffiml {command}: ")


@pytest.fixture(scope="module")
def good_image(tmp_path_factory):
    import cv2

    path = tmp_path_factory.mktemp("img") / "good.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    return path


def test_no_matching_input_is_one_line(tmp_path):
    done = _run("localize", str(tmp_path / "nothing-here" / "*.png"), "--out", str(tmp_path / "out"))
    _assert_one_line_error(done, "localize")
    assert "no input images matched" in done.stderr and done.returncode == 2


def test_a_photo_folder_that_does_not_exist_is_one_line(tmp_path):
    done = _run("make-synthetic", str(tmp_path / "out"), "--photos", str(tmp_path / "no-photos"), "--n", "2")
    _assert_one_line_error(done, "make-synthetic")


def test_an_unwritable_out_is_one_line_before_any_work(tiny_bundle, good_image, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done = _run("localize", str(good_image), "--bundle", str(tiny_bundle), "--out", str(blocker / "sub"))
    _assert_one_line_error(done, "localize")
    assert "output folder" in done.stderr and done.returncode == 2


def test_a_folder_without_images_given_as_input_is_one_line(tiny_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    done = _run("localize", str(tmp_path / "empty"), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"))
    _assert_one_line_error(done, "localize")


def test_a_bundle_that_is_a_file_is_one_line(good_image, tmp_path):
    fake = tmp_path / "bundle"
    fake.write_text("not a folder")
    done = _run("localize", str(good_image), "--bundle", str(fake), "--out", str(tmp_path / "out"))
    _assert_one_line_error(done, "localize")
    assert "not an engine bundle" in done.stderr and done.returncode == 2


@pytest.mark.parametrize("kind", ["truncated png", "bmp claiming 60000x60000"])
def test_a_corrupt_image_beside_a_good_one_fails_alone(tiny_bundle, good_image, tmp_path, kind):
    from test_decode_fuzz import lying_headers

    bad = tmp_path / ("bad.png" if kind.endswith("png") else "bad.bmp")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40 if kind.endswith("png") else lying_headers()["bmp"])
    done = _run("localize", str(good_image), str(bad), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert any(line.startswith("diffiml localize: ") and str(bad) in line for line in done.stderr.splitlines())
    assert (tmp_path / "out" / "good_mask.png").is_file() and not (tmp_path / "out" / "bad_mask.png").exists()


def test_fast_with_a_server_is_refused_before_any_local_bundle_is_read(good_image, tmp_path):
    """The server runs its own bundle: --fast must not read (or need) a local one and send its step count."""
    done = _run("localize", str(good_image), "--out", str(tmp_path / "out"), "--server", "http://127.0.0.1:9",
                "--fast", "--bundle", str(tmp_path / "no-such-bundle"))
    _assert_one_line_error(done, "localize")
    assert "--fast" in done.stderr and "local only" in done.stderr and "no-such-bundle" not in done.stderr
