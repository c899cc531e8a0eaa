"""The image-level detector: a calibrated probability from the runtime's evidence, a threshold for a target
false-alarm rate, and masks that follow the decision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffiml.export.detector_fit import FitError, fit_detector, fit_logistic, threshold_for_rate
from diffiml.runtime.detector import Detector, map_evidence, spread_evidence
from diffiml.runtime.errors import BundleError


def _detector(threshold: float = 0.5, weight: float = 4.0) -> Detector:
    return Detector(("map_top",), np.array([0.5]), np.array([0.25]), np.array([weight]), 0.0, 1.0, 0.0, threshold,
                    0.05, {})


def test_probability_grows_with_the_evidence_and_stays_in_0_1() -> None:
    d = _detector()
    low, mid, high = (d.probability({"map_top": v}) for v in (0.0, 0.5, 1.0))
    assert 0.0 < low < mid < high < 1.0 and mid == pytest.approx(0.5)


def test_manifest_round_trip_and_refusals() -> None:
    d = _detector(threshold=0.7)
    again = Detector.from_manifest(json.loads(json.dumps(d.manifest())), "m")
    assert again.probability({"map_top": 0.8}) == pytest.approx(d.probability({"map_top": 0.8}))
    assert again.threshold == 0.7
    for bad in ({"method": "other"}, {**d.manifest(), "weights": [1.0, 2.0]}, {**d.manifest(), "scale": [0.0]},
                {**d.manifest(), "threshold": 1.5}, {**d.manifest(), "platt": "x"}):
        with pytest.raises(BundleError):
            Detector.from_manifest(bad, "m")
    with pytest.raises(BundleError, match="map_top"):
        d.probability({"map_max": 1.0})


def test_map_and_spread_evidence() -> None:
    prob = np.zeros((64, 64), np.float32)
    prob[:8, :8] = 0.9  # one region of 64 pixels
    prob[40:42, 40:42] = 0.6  # and a small one
    ev = map_evidence(prob)
    assert ev["map_area"] == pytest.approx(68 / 4096) and ev["map_largest"] == pytest.approx(64 / 4096)
    assert ev["map_max"] == pytest.approx(0.9)
    spread = np.full((8, 8), 0.1, np.float32)
    spread[0, 0] = 0.5  # the members disagree where the region is
    sp = spread_evidence(spread, prob)
    assert sp["spread_marked"] == pytest.approx(0.5) and sp["spread_mean"] < sp["spread_marked"]


def test_logistic_fit_separates_and_regularization_shrinks() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.1 * rng.normal(size=400) > 0).astype(float)
    w, _ = fit_logistic(x, y, l2=0.1)
    assert w[0] > 3 * max(abs(w[1]), abs(w[2]))
    w_strong, _ = fit_logistic(x, y, l2=1000.0)
    assert abs(w_strong[0]) < abs(w[0])


def test_threshold_keeps_false_alarms_at_or_under_the_target() -> None:
    p = np.linspace(0, 1, 101)
    for rate in (0.0, 0.05, 0.2):
        t = threshold_for_rate(p, rate)
        assert (p >= t).mean() <= rate
        assert (p >= np.nextafter(t, 0)).mean() > rate  # and no stricter than it needs to be


def _rows(n: int, seed: int) -> list[dict]:
    """Rows as `diffiml eval --rows` writes them: manipulated images have a higher map_top and cue_residual."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        manipulated = i % 2 == 0
        ev = {"map_top": float(rng.normal(0.7 if manipulated else 0.4, 0.15)), "map_max": float(rng.random()),
              "map_mean": float(rng.random()), "map_area": float(rng.random()), "map_largest": float(rng.random()),
              "spread_mean": float(rng.random()), "spread_marked": float(rng.random()),
              "cue_area": 0.0, "cue_transforms": 0.0, "cue_pairs": float(rng.random()), "cue_exact": 0.0,
              "cue_residual": float(rng.normal(0.6 if manipulated else 0.2, 0.1)), "cond_mean_0": float(rng.random()),
              "cond_max_0": float(rng.random())}
        rows.append({"image": f"/data/Tp/{i:05d}.png", "manipulated": manipulated, "evidence": ev})
    return rows


def test_fit_detector_calibrates_on_held_out_photos_and_meets_its_false_alarm_rate() -> None:
    rows = _rows(2000, seed=1)
    sources = {f"Tp/{i:05d}.png": f"photo{i // 3}" for i in range(2000)}  # three images per photo
    detector, candidates = fit_detector(rows, sources, "abc", target_false_alarm_rate=0.05, calibration_fraction=0.5)
    assert detector.record["checkpoint_sha256"] == "abc"
    assert detector.record["calibration_false_alarm_rate"] <= 0.05
    chosen = next(c for c in candidates if c.names == detector.names)
    top_only = next(c for c in candidates if c.names == ("map_top",))
    assert "cue_residual" in detector.names and chosen.cv_loss < top_only.cv_loss
    # held out by photo: no photo on both sides
    from diffiml.export.detector_fit import calibration_mask, photo_of

    held = calibration_mask(rows, sources, 0.5)
    assert not {photo_of(r, sources) for r, h in zip(rows, held, strict=True) if h} & {
        photo_of(r, sources) for r, h in zip(rows, held, strict=True) if not h}
    fresh = _rows(2000, seed=2)
    authentic = [detector.probability(r["evidence"]) for r in fresh if not r["manipulated"]]
    assert np.mean(np.array(authentic) >= detector.threshold) <= 0.09  # the target, up to sampling error


def test_fit_detector_refuses_one_class() -> None:
    rows = [r for r in _rows(100, seed=3) if r["manipulated"]]
    with pytest.raises(FitError):
        fit_detector(rows, {}, "abc")


def _bundle_with_detector(tiny_bundle: Path, tmp_path: Path, threshold: float) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["detector"] = _detector(threshold=threshold).manifest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_masks_follow_the_decision_when_asked_and_show_every_region_by_default(tiny_bundle: Path, tmp_path: Path
                                                                                ) -> None:
    from diffiml.runtime.localizer import Localizer
    from diffiml.runtime.outputs import write_outputs

    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    never = _bundle_with_detector(tiny_bundle, tmp_path, threshold=1.0)  # no image is judged manipulated
    with Localizer.open(never, copy_move=False, follow_decision=True) as quiet, \
            Localizer.open(never, copy_move=False) as loud:
        judged, shown = quiet.localize(rgb), loud.localize(rgb)
    assert judged.decision is False and shown.decision is False
    assert judged.regions_shown is False and shown.regions_shown is True
    assert judged.score == pytest.approx(shown.score)
    np.testing.assert_array_equal(judged.model_probability, shown.model_probability)  # the map is the model's
    assert not judged.mask.any() and judged.manipulated_fraction == 0.0
    files = write_outputs(judged, rgb, tmp_path / "out", "x")
    import cv2

    assert not cv2.imread(files["mask"], cv2.IMREAD_GRAYSCALE).any()
    prob16 = cv2.imread(files["prob"], cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(prob16, shown.probability16())
    assert (shown.mask == (shown.probability16() >= 32768)).all()
    assert set(judged.evidence) >= {"map_top", "spread_mean", "cue_residual", "cond_mean_0"}


def test_a_bundle_without_a_detector_scores_by_the_map(tiny_bundle: Path) -> None:
    from diffiml.runtime.localizer import Localizer, image_score

    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    with Localizer.open(tiny_bundle, copy_move=False) as localizer:
        r = localizer.localize(rgb)
    assert r.score == pytest.approx(image_score(r.model_probability)) and r.decision == (r.score >= 0.5)


def test_calibration_rows_set_the_threshold_when_given() -> None:
    """Rows from unseen photos calibrate; the fitting rows are all used to fit."""
    fit, calibration = _rows(600, seed=4), _rows(300, seed=5)
    detector, _ = fit_detector(fit, {}, "abc", target_false_alarm_rate=0.1, calibration_rows=calibration)
    assert detector.record["rows_calibration"] == 300 and detector.record["rows_fitting"] == 600
    authentic = np.array([detector.probability(r["evidence"]) for r in calibration if not r["manipulated"]])
    assert np.mean(authentic >= detector.threshold) <= 0.1 < np.mean(authentic >= np.nextafter(detector.threshold, 0))


def test_an_image_judged_authentic_gets_an_empty_mask_file_and_the_model_map(tmp_path: Path) -> None:
    """With a map that marks pixels, following the decision empties the mask and the overlay's heat, never the map."""
    import cv2

    from diffiml.runtime.localizer import LocalizationResult
    from diffiml.runtime.outputs import write_outputs

    prob = np.zeros((64, 64), np.float32)
    prob[10:30, 10:30] = 0.9
    rgb = np.full((64, 64, 3), 100, np.uint8)
    hidden = LocalizationResult(prob, None, 64, 64, 0.1, decision=False, regions_shown=False)
    shown = LocalizationResult(prob, None, 64, 64, 0.1, decision=False, regions_shown=True)
    assert shown.mask.any() and not hidden.mask.any() and hidden.manipulated_fraction == 0.0
    a, b = write_outputs(hidden, rgb, tmp_path / "a", "x"), write_outputs(shown, rgb, tmp_path / "b", "x")
    assert not cv2.imread(a["mask"], cv2.IMREAD_GRAYSCALE).any() and cv2.imread(b["mask"], cv2.IMREAD_GRAYSCALE).any()
    np.testing.assert_array_equal(cv2.imread(a["overlay"])[..., ::-1], rgb)  # no heat drawn
    maps = [cv2.imread(files["prob"], cv2.IMREAD_UNCHANGED) for files in (a, b)]
    np.testing.assert_array_equal(*maps)


def test_eval_counts_false_alarms_on_authentic_images() -> None:
    from diffiml.benchmarks.metrics import false_alarms

    rows = [{"manipulated": True, "decision": True}, {"manipulated": True, "decision": False},
            {"manipulated": False, "decision": True, "marked": True, "marked_fraction": 0.2},
            {"manipulated": False, "decision": False, "marked": False, "marked_fraction": 0.0},
            {"manipulated": False, "decision": False, "marked": True, "marked_fraction": 0.1},
            {"manipulated": False, "decision": False, "marked": False, "marked_fraction": 0.0}]
    out = false_alarms(rows)
    assert out["n_authentic"] == 4 and out["authentic_marked_share"] == pytest.approx(0.5)
    assert out["authentic_marked_area"] == pytest.approx(0.075)
    assert out["detection_rate"] == pytest.approx(0.5) and out["false_alarm_rate"] == pytest.approx(0.25)
    assert out["balanced_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
