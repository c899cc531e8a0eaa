"""The classical copy-move cue: it finds translated, rotated and mirrored copies in a textured image, marks source
and copy, stays silent on an image without copies, and the Localizer fuses it with the model's map."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffiml.runtime.bundle import load_bundle
from diffiml.runtime.copy_move import CopyMoveCue, find_copy_moves
from diffiml.runtime.errors import BundleError
from diffiml.runtime.localizer import Localizer
from diffiml.runtime.metrics import pixel_f1


def _texture(seed: int, size: int = 320) -> np.ndarray:
    """A photo-like texture without repeats: smoothed noise at several scales."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float32)
    for sigma, std in ((1.0, 12.0), (3.0, 20.0), (9.0, 30.0)):
        layer = cv2.GaussianBlur(rng.normal(0, 1, (size, size, 3)).astype(np.float32), (0, 0), sigma)
        img += std * layer / layer.std()
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def _copy(img: np.ndarray, src: tuple[int, int], dst: tuple[int, int], side: int, how: str = "translate"
          ) -> tuple[np.ndarray, np.ndarray]:
    """Paste the block at ``src`` to ``dst`` (translated, mirrored or rotated 30° inside a disc); truth marks both."""
    out = img.copy()
    (sy, sx), (dy, dx) = src, dst
    block = img[sy : sy + side, sx : sx + side]
    disc = np.zeros((side, side), np.uint8)
    cv2.circle(disc, (side // 2, side // 2), side // 2 - 1, 1, -1)
    if how == "mirror":
        block = block[:, ::-1]
    elif how == "rotate":
        rot = cv2.getRotationMatrix2D((side / 2, side / 2), 30, 1.0)
        block = cv2.warpAffine(block, rot, (side, side), flags=cv2.INTER_LINEAR)
    region = disc.astype(bool)
    out[dy : dy + side, dx : dx + side][region] = block[region]
    truth = np.zeros(img.shape[:2], bool)
    truth[sy : sy + side, sx : sx + side] |= region
    truth[dy : dy + side, dx : dx + side] |= region
    return out, truth


@pytest.mark.parametrize("how", ["translate", "rotate", "mirror"])
def test_finds_source_and_copy(how: str) -> None:
    forged, truth = _copy(_texture(1), (30, 40), (170, 190), 90, how)
    finding = find_copy_moves(forged, CopyMoveCue())
    assert finding.transforms >= 1
    assert pixel_f1(finding.mask.astype(bool), truth) > 0.7


def test_mirrored_copies_need_the_mirrored_descriptors() -> None:
    forged, truth = _copy(_texture(2), (30, 40), (170, 190), 90, "mirror")
    assert pixel_f1(find_copy_moves(forged, replace(CopyMoveCue(), flips=False)).mask.astype(bool), truth) < 0.3


def test_permuted_bins_are_what_sift_computes_on_the_mirror_image() -> None:
    """MIRROR_BINS stands in for a second SIFT pass: at each keypoint's mirror (angle 180 - a), SIFT on the mirrored
    image gives the permuted descriptor up to resampling, far closer than any other descriptor of the image."""
    from diffiml.runtime.copy_move import MIRROR_BINS

    gray = cv2.cvtColor(_texture(4), cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=300)
    keypoints, desc = sift.detectAndCompute(gray, None)
    width = gray.shape[1]
    mirrored = [cv2.KeyPoint(width - 1 - k.pt[0], k.pt[1], k.size, (180 - k.angle) % 360, k.response, k.octave)
                for k in keypoints]
    kept, on_mirror = sift.compute(np.ascontiguousarray(gray[:, ::-1]), mirrored)
    assert len(kept) == len(keypoints)
    permuted = desc[:, MIRROR_BINS]
    own = np.linalg.norm(permuted - on_mirror, axis=1)
    nearest_other = np.sort(np.linalg.norm(permuted[:, None] - on_mirror[None], axis=2), axis=1)[:, 1]
    assert np.median(own) < 0.25 * np.median(nearest_other)
    assert np.mean(own < nearest_other) > 0.95


def test_grey_images_are_read_as_they_are() -> None:
    forged, truth = _copy(_texture(7), (30, 40), (170, 190), 90)
    grey = cv2.cvtColor(forged, cv2.COLOR_RGB2GRAY)
    assert pixel_f1(find_copy_moves(grey, CopyMoveCue()).mask.astype(bool), truth) > 0.7


@pytest.mark.parametrize("seed", [3, 4])
def test_silent_without_a_copy(seed: int) -> None:
    finding = find_copy_moves(_texture(seed), CopyMoveCue())
    assert finding.transforms == 0 and not finding.mask.any()


def test_large_inputs_are_worked_on_reduced() -> None:
    forged, truth = _copy(_texture(5, 640), (60, 80), (340, 380), 180)
    mask = find_copy_moves(forged, replace(CopyMoveCue(), max_side=320)).mask
    assert mask.shape == (320, 320)
    assert pixel_f1(cv2.resize(mask, (640, 640), interpolation=cv2.INTER_NEAREST) > 0, truth) > 0.7


def _bundle_copy(tiny_bundle: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_localizer_fuses_the_cue_by_max(tiny_bundle: Path) -> None:
    assert load_bundle(tiny_bundle).copy_move_cue == CopyMoveCue()  # the exporter enables it by default
    forged, truth = _copy(_texture(6), (30, 40), (170, 190), 90)
    with Localizer.open(tiny_bundle, backend="ort-cpu", ensemble=2) as with_cue, \
            Localizer.open(tiny_bundle, backend="ort-cpu", ensemble=2, copy_move=False) as model_only:
        fused, alone = with_cue.localize(forged), model_only.localize(forged)
    assert alone.model_copy_move is None and alone.copy_move_fraction is None
    np.testing.assert_array_equal(fused.model_probability,
                                  np.maximum(alone.model_probability, fused.model_copy_move))
    cue = cv2.resize(fused.model_copy_move, truth.shape[::-1], interpolation=cv2.INTER_LINEAR) >= 0.5
    assert pixel_f1(cue, truth) > 0.6 and fused.copy_move_fraction > 0.1  # (the tiny model's own map is random)
    assert "copy_move" in fused.timings_ms and "copy_move" not in alone.timings_ms


def test_manifest_settings_are_checked(tiny_bundle: Path, tmp_path: Path) -> None:
    def other_method(m: dict) -> None:
        m["copy_move_cue"]["method"] = "patchmatch"

    def unknown_setting(m: dict) -> None:
        m["copy_move_cue"]["octaves"] = 3

    def text_for_a_number(m: dict) -> None:
        m["copy_move_cue"]["max_side"] = "1024"

    def text_for_a_boolean(m: dict) -> None:
        m["copy_move_cue"]["flips"] = "no"

    def fraction_for_a_count(m: dict) -> None:
        m["copy_move_cue"]["min_inliers"] = 5.5

    for i, edit in enumerate((other_method, unknown_setting, text_for_a_number, text_for_a_boolean,
                              fraction_for_a_count)):
        with pytest.raises(BundleError, match="copy_move_cue"):
            load_bundle(_bundle_copy(tiny_bundle, tmp_path / str(i), edit))


def test_version_3_bundles_load_without_the_cue(tiny_bundle: Path, tmp_path: Path) -> None:
    def version3(m: dict) -> None:
        m["format_version"] = 3
        del m["copy_move_cue"]

    bundle = load_bundle(_bundle_copy(tiny_bundle, tmp_path, version3))
    assert bundle.copy_move_cue is None


def _object(seed: int, detail_seed: int, size: int = 320) -> np.ndarray:
    """Coarse content (shapes, shading) of ``seed`` with fine detail of its own (``detail_seed``): two windows of one
    facade share the first, never the second."""
    rng, img = np.random.default_rng(seed), np.zeros((size, size, 3), np.float32)
    for sigma, std in ((3.0, 20.0), (9.0, 30.0)):
        layer = cv2.GaussianBlur(rng.normal(0, 1, (size, size, 3)).astype(np.float32), (0, 0), sigma)
        img += std * layer / layer.std()
    detail = np.random.default_rng(detail_seed).normal(0, 1, (size, size, 3)).astype(np.float32)
    detail = cv2.GaussianBlur(detail, (0, 0), 1.0)
    return np.clip(img + 6.0 * detail / detail.std() + 128, 0, 255).astype(np.uint8)


def test_a_copy_carries_its_fine_detail_and_a_repetition_does_not() -> None:
    """The same coarse content twice: copied pixel for pixel (a copy-move) it is marked; repeated with fine detail of
    its own (a facade's second window) it passes content verification but not the residual check, and the mask stays
    empty."""
    copied, truth = _copy(_object(5, 99), (30, 40), (170, 190), 90)
    repeated = _object(5, 99)
    twin, _ = _copy(_object(5, 100), (30, 40), (170, 190), 90)  # the same object, its own fine detail
    disc = np.zeros((90, 90), np.uint8)
    cv2.circle(disc, (45, 45), 44, 1, -1)
    repeated[170:260, 190:280][disc > 0] = twin[170:260, 190:280][disc > 0]
    cue = CopyMoveCue()
    copy_finding, repeat_finding = find_copy_moves(copied, cue), find_copy_moves(repeated, cue)
    assert repeat_finding.candidates >= 1, "the repetition must pass content verification for the test to mean much"
    assert copy_finding.residual > 0.5 > cue.residual_threshold > repeat_finding.residual
    assert not repeat_finding.mask.any() and repeat_finding.transforms == 0
    assert pixel_f1(copy_finding.mask.astype(bool), truth) > 0.7
    # what content verification found is the detector's evidence, whatever the threshold
    assert repeat_finding.evidence()["cue_area"] > 0 and repeat_finding.evidence()["cue_transforms"] >= 1


def test_each_keypoint_pair_counts_once() -> None:
    from diffiml.runtime.copy_move import unique_pairs

    a, b = (10.0, 20.0), (200.0, 220.0)
    pairs = np.array([[a, b], [b, a], [a, b], [(11.0, 20.0), (201.0, 220.0)]], np.float32)
    assert len(unique_pairs(pairs)) == 2


@pytest.mark.parametrize("setting", ["neighbours", "min_inliers", "max_keypoints", "max_side"])
def test_cue_settings_that_would_break_it_are_refused(setting: str) -> None:
    entry = {**CopyMoveCue().manifest(), setting: 0}
    with pytest.raises(BundleError, match=setting):
        CopyMoveCue.from_manifest(entry, "manifest.json")


def test_bundles_written_before_the_residual_check_keep_their_behaviour() -> None:
    entry = CopyMoveCue().manifest()
    del entry["residual_threshold"]
    assert CopyMoveCue.from_manifest(entry, "manifest.json").residual_threshold == 0.0


def test_the_score_hears_the_cue(tiny_bundle: Path) -> None:
    """The cue's findings reach the detector's evidence, so a detector that weighs them scores the copy higher (a
    score computed without the cue's evidence survived the earlier tests)."""
    from diffiml.runtime.detector import Detector

    forged, _ = _copy(_texture(6), (30, 40), (170, 190), 90)
    weighs_cue = Detector(("cue_area",), np.zeros(1), np.full(1, 0.01), np.ones(1), 0.0, 1.0, 0.0, 0.6, 0.05, {})
    with Localizer.open(tiny_bundle, backend="ort-cpu", ensemble=2) as with_cue, \
            Localizer.open(tiny_bundle, backend="ort-cpu", ensemble=2, copy_move=False) as model_only:
        with_cue.detector = model_only.detector = weighs_cue
        fused, alone = with_cue.localize(forged), model_only.localize(forged)
    assert fused.evidence["cue_area"] > 0 and alone.evidence["cue_area"] == 0
    assert fused.score > 0.9 and alone.score == 0.5 and fused.decision and not alone.decision


def test_regions_under_min_region_are_dropped() -> None:
    forged, _ = _copy(_texture(6), (30, 40), (170, 190), 90)
    assert find_copy_moves(forged, CopyMoveCue()).mask.mean() > 0.05
    huge = replace(CopyMoveCue(), min_region=0.5)  # every verified region is smaller than half the image
    assert not find_copy_moves(forged, huge).mask.any()
