import json

import cv2
import numpy as np
import pytest

from diffiml.train.data.dataset import ForgeryDataset
from diffiml.train.data.readers import DatasetError, Sample, load_pair, read_dataset, read_mask
from diffiml.train.data.synthetic import MANIPULATIONS


def _png(path, array):
    cv2.imwrite(str(path), array)
    return path


def test_json_list_reads_pairs_and_negatives(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "a_gt.png", np.full((8, 8), 255, np.uint8))
    (tmp_path / "list.json").write_text(json.dumps([["a.png", "a_gt.png"], ["a.png", "Negative"]]))
    samples = read_dataset(tmp_path / "list.json")
    assert [s.mask is None for s in samples] == [False, True]
    image, mask = load_pair(samples[1])
    assert image.shape == (8, 8, 3) and mask.sum() == 0


def test_json_list_skips_rows_with_missing_files_and_names_them(tmp_path, caplog):
    _png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "list.json").write_text(json.dumps([["a.png", "Negative"], ["gone.png", "Negative"], [1, 2]]))
    assert len(read_dataset(tmp_path / "list.json")) == 1
    assert "gone.png" in caplog.text


def test_broken_json_is_refused_with_the_file_name(tmp_path):
    (tmp_path / "list.json").write_text("[[")
    with pytest.raises(DatasetError, match="list.json"):
        read_dataset(tmp_path / "list.json")


def test_tp_gt_folder_matches_by_stem_and_treats_unmatched_as_authentic(tmp_path):
    (tmp_path / "Tp").mkdir()
    (tmp_path / "Gt").mkdir()
    _png(tmp_path / "Tp" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "Tp" / "y.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "Gt" / "x_gt.png", np.full((8, 8), 255, np.uint8))
    samples = {s.image.name: s for s in read_dataset(tmp_path)}
    assert samples["x.jpg"].mask.name == "x_gt.png" and samples["y.png"].mask is None


def test_masks_binarize_at_half_their_range(tmp_path):
    m16 = np.array([[0, 30000], [40000, 65535]], np.uint16)
    assert read_mask(_png(tmp_path / "m.png", m16)).tolist() == [[0, 0], [1, 1]]


def test_size_mismatch_and_unreadable_images_are_skipped_not_fatal(tmp_path, caplog):
    _png(tmp_path / "big.png", np.zeros((16, 16, 3), np.uint8))
    _png(tmp_path / "small.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    good = _png(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    samples = [Sample(tmp_path / "big.png", tmp_path / "small.png"), Sample(tmp_path / "junk.png", None),
               Sample(good, None)]
    item = ForgeryDataset(samples, 32, train=False)[0]
    assert item["image"].shape == (3, 32, 32)
    assert "differs from image size" in caplog.text and "junk.png" in caplog.text


def test_synthetic_set_holds_out_one_manipulation_type(synthetic_set):
    holdout = json.loads((synthetic_set / "holdout.json").read_text())
    train = json.loads((synthetic_set / "train.json").read_text())
    assert holdout and all("inpaint" in row[0] for row in holdout)
    assert not any("inpaint" in row[0] for row in train)
    kinds = {row[0].split("_", 1)[1].removesuffix(".png") for row in train}
    assert kinds <= set(MANIPULATIONS) | {"authentic"} and len(kinds) >= 3


def test_synthetic_masks_match_their_images(synthetic_set):
    for row in json.loads((synthetic_set / "train.json").read_text()):
        if row[1] != "Negative":
            image, mask = load_pair(Sample(synthetic_set / row[0], synthetic_set / row[1]))
            assert 0 < mask.mean() < 0.9
