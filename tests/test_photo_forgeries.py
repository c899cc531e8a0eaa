"""Forgeries made from real photographs: split by source photo, held-out type kept out of training, masks right."""

import json

import cv2
import numpy as np
import pytest

from diffiml.train.data.photo_forgeries import (
    camera_history,
    composite,
    copy_move,
    find_photos,
    is_eval_photo,
    make_photo_forgeries,
    read_photo,
)
from diffiml.train.data.readers import read_dataset


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Textured stand-in photos in the BSDS layout (some with segment maps) and a flat folder."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "bsds" / "images" / "train").mkdir(parents=True)
    (root / "bsds" / "segments" / "train").mkdir(parents=True)
    (root / "flat").mkdir()
    for i in range(24):
        img = cv2.GaussianBlur(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), (0, 0), 2.0)
        if i % 2:
            cv2.imwrite(str(root / "bsds" / "images" / "train" / f"{i}.jpg"), img)
            labels = np.ones((96, 128), np.uint16)
            labels[20:60, 30:80] = 2
            cv2.imwrite(str(root / "bsds" / "segments" / "train" / f"{i}.png"), labels)
        else:
            cv2.imwrite(str(root / "flat" / f"{i}.png"), img)
    return root


def test_photos_are_found_with_their_segment_maps(photo_folder):
    photos = find_photos(photo_folder)
    assert len(photos) == 24
    assert sum(p.segments is not None for p in photos) == 12
    image, labels = read_photo(next(p for p in photos if p.segments))
    assert image.shape == (96, 128, 3) and labels.shape == (96, 128)


def test_the_split_by_source_photo_is_stable(photo_folder):
    photos = find_photos(photo_folder)
    first = [is_eval_photo(p, photo_folder, 0.3) for p in photos]
    assert first == [is_eval_photo(p, photo_folder, 0.3) for p in photos]
    assert 0 < sum(first) < len(first)


def test_a_feathered_paste_marks_the_pixels_that_changed_most():
    host = np.zeros((80, 80, 3), np.uint8)
    patch = np.full((40, 40, 3), 200, np.uint8)
    region = np.zeros((40, 40), np.uint8)
    region[5:35, 5:35] = 1
    for seed in range(6):  # hard and feathered edges both occur
        image, mask = composite(host, patch, region, 10, 20, np.random.default_rng(seed))
        assert mask[20:40, 30:50].all() and 0.8 * 900 < mask.sum() < 1.2 * 900
        assert image[mask > 0].mean() > 100 and image[mask == 0].mean() < 30


def test_forgery_set_keeps_sources_apart_and_the_holdout_type_out_of_training(photo_folder, tmp_path):
    counts = make_photo_forgeries(photo_folder, tmp_path, n=60, seed=1, eval_fraction=0.3)
    assert counts["train"] + counts["calibration"] + counts["test"] + counts["holdout"] == 60
    lists = {k: json.loads((tmp_path / f"{k}.json").read_text()) for k in ("train", "calibration", "test", "holdout")}
    sources = json.loads((tmp_path / "sources.json").read_text())
    photos = {k: {sources[row[0]] for row in rows} for k, rows in lists.items()}
    # training, calibration and test photos are three disjoint sets (the holdout type comes from either of the last two)
    assert not (photos["train"] & (photos["calibration"] | photos["test"] | photos["holdout"]))
    assert not photos["calibration"] & photos["test"]
    assert not any(kind == "inpaint" for _, _, kind in lists["train"])
    assert all(kind == "inpaint" for _, _, kind in lists["holdout"])
    kinds = {kind for _, _, kind in lists["train"]}
    assert {"splice", "copymove", "authentic"} <= kinds
    for img, mask, kind in lists["train"]:
        assert (mask == "Negative") == (kind == "authentic") and kind in img
    samples = read_dataset(tmp_path / "train.json")
    assert len(samples) == counts["train"]  # every row is readable, image and mask the same size
    assert [s.type for s in samples] == [kind for _, _, kind in lists["train"]]
    for sample in samples[:10]:
        if sample.mask is not None:
            m = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
            assert 0 < (m > 127).mean() < 0.9


def test_make_synthetic_cli_takes_a_photo_folder(photo_folder, tmp_path, capsys):
    from diffiml.cli import main

    assert main(["make-synthetic", str(tmp_path / "set"), "--photos", str(photo_folder), "--n", "8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_photos"] > 0


def test_the_crop_keeps_the_segment_map_aligned():
    image = np.zeros((120, 160, 3), np.uint8)
    labels = np.zeros((120, 160), np.uint16)
    image[40:80, 50:100] = 255
    labels[40:80, 50:100] = 7
    cropped = 0
    for seed in range(12):
        out, out_labels = camera_history(image, labels, np.random.default_rng(seed))
        assert out_labels is not None and out_labels.shape == out.shape[:2]
        assert ((out_labels == 7) == (out[..., 0] > 127)).mean() > 0.99
        cropped += out.shape[:2] != image.shape[:2]
    assert cropped  # some hosts were cropped, and kept their segments


def test_copy_moves_mark_source_and_copies_and_sometimes_paste_twice():
    rng0 = np.random.default_rng(0)
    host = cv2.GaussianBlur(rng0.integers(0, 256, (160, 200, 3), dtype=np.uint8), (0, 0), 1.5)
    labels = np.ones((160, 200), np.uint16)
    labels[30:70, 40:90] = 2  # one object of 6 % of the image
    several = 0
    for seed in range(30):
        made = copy_move(host, labels, np.random.default_rng(seed), mark_source=True)
        if made is None:
            continue
        image, mask = made
        changed = np.abs(image.astype(int) - host.astype(int)).max(axis=2) > 8
        target_only = copy_move(host, labels, np.random.default_rng(seed), mark_source=False)[1]
        assert (mask >= target_only).all() and mask.sum() > target_only.sum()  # the source is marked too
        assert changed[target_only == 0].mean() < 0.02  # nothing changed outside the copies
        n, _ = cv2.connectedComponents(target_only)
        several += n - 1 >= 2
    assert several  # some images carry two or three copies
