"""The serving model's batch logic without a server: what Triton hands the callable (a batch of requests, each with
rows and parameters) and what it must answer. A bad row answers its error and never fails its neighbours; rows of
different seeds and ensembles are answered as local runs with their settings."""

import json
import urllib.request

import cv2
import numpy as np
import pytest

from diffiml.runtime.backends import open_backend
from diffiml.runtime.bundle import load_bundle
from diffiml.runtime.localizer import Localizer
from diffiml.runtime.serving.server import MAX_ENSEMBLE, InstanceModel
from diffiml.runtime.serving.stats import start_stats_server


class Request:
    """What PyTriton passes: inputs by name, request parameters, the outputs the client asked for."""

    def __init__(self, images: list[bytes], parameters: dict | None = None, outputs: list[str] | None = None):
        self.data = {"image": np.array([[x] for x in images], dtype=object)}
        self.parameters = parameters or {}
        self.requested_output_names = outputs

    def __getitem__(self, key):
        return self.data[key]


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def model(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return InstanceModel(bundle, open_backend(bundle, "ort-cpu"))


def _local(tiny_bundle, data: bytes, **settings) -> np.ndarray:
    return Localizer.open(tiny_bundle, backend="ort-cpu", **settings).localize(data).model_probability


def test_one_bad_row_answers_its_error_and_the_others_share_a_batch_with_their_own_seeds(model, tiny_bundle):
    from test_decode_fuzz import lying_headers

    good = [_png(i) for i in range(3)]
    requests = [Request([good[0]], {"seed": 1, "raw": True}),
                Request([lying_headers()["bmp"], good[1]], {"seed": 2, "raw": True}),
                Request([good[2]], {"seed": 3, "raw": True, "ensemble": 1}),
                Request([good[0]], {"seed": "--5"}), Request([good[0]], {"steps": "²"}),
                Request([good[0]], {"ensemble": MAX_ENSEMBLE + 1})]
    before = model.stats.prometheus()
    answers = model(requests)
    assert len(answers) == len(requests) and [a["error"].shape[0] for a in answers] == [1, 2, 1, 1, 1, 1]
    bad = answers[1]["error"][0, 0].decode()
    assert "<bytes>" in bad and "pixels" in bad and np.isnan(answers[1]["score"][0, 0])
    assert np.isnan(answers[1]["raw_probability"][0]).all()
    for answer, row, data, settings in ((answers[0], 0, good[0], {"seed": 1}), (answers[1], 1, good[1], {"seed": 2}),
                                        (answers[2], 0, good[2], {"seed": 3, "ensemble": 1})):
        assert answer["error"][row, 0] == b""
        np.testing.assert_allclose(answer["raw_probability"][row], _local(tiny_bundle, data, **settings), atol=1e-5)
        info = json.loads(answer["info_json"][row, 0])
        assert info["members"] == settings.get("ensemble", 2) and info["seed"] == settings["seed"]
        assert info["bundle_sha256"]["unet"] == load_bundle(tiny_bundle).graph("unet").sha256
        assert info["opencv"] == cv2.__version__  # the cue's keypoints depend on it
    assert json.loads(answers[0]["info_json"][0, 0])["batch_images"] == 2  # seeds 1 and 2: one batch
    assert "must be an integer" in answers[3]["error"][0, 0].decode()
    assert "must be an integer" in answers[4]["error"][0, 0].decode()
    assert f"[1, {MAX_ENSEMBLE}]" in answers[5]["error"][0, 0].decode()
    after = model.stats.prometheus()
    assert before != after and 'diffiml_row_failures_total{kind="decode"} 1' in after
    assert 'diffiml_row_failures_total{kind="parameters"} 3' in after and 'outcome="ok"} 3' in after


def test_only_the_requested_outputs_are_encoded(model):
    (lean,) = model([Request([_png(0)], outputs=["score", "error"])])
    (full,) = model([Request([_png(0)])])
    assert lean["probability_png"][0, 0] == b"" and full["probability_png"][0, 0][:4] == b"\x89PNG"
    assert lean["score"][0, 0] == full["score"][0, 0]


def test_a_request_that_is_not_even_an_image_list_fails_alone(model):
    class Broken(Request):
        def __getitem__(self, key):
            raise KeyError(key)

    answers = model([Broken([]), Request([_png(1)])])
    assert answers[0]["error"][0, 0] and answers[1]["error"][0, 0] == b""


def test_the_stats_port_serves_the_counts_and_the_bundle(model):
    server = start_stats_server(model.stats, "127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=10).read()
    finally:
        server.shutdown()
    text = body.decode()
    assert "diffiml_rows_total" in text and f'sha256="{model.bundle_sha256["unet"]}"' in text


def test_instances_go_round_robin_over_the_gpus(tiny_bundle, monkeypatch):
    from diffiml.runtime.serving import server as serving

    seen = []

    def recording(bundle, kind, threads, precision, device_id=0):
        seen.append(device_id)
        return open_backend(bundle, "ort-cpu", threads, precision)  # stands in for a CUDA backend on that GPU

    monkeypatch.setattr(serving, "device_count", lambda: 2)
    monkeypatch.setattr(serving, "open_backend", recording)
    models = serving.open_instances(serving.ServeOptions(bundle=tiny_bundle, instances=3))
    assert seen == [0, 1, 0] and models[0].stats is models[2].stats
    assert 'outcome="ok"} 0' in models[0].stats.prometheus()  # the warm-up requests are not counted


def test_a_row_that_fails_inference_fails_alone_in_its_batch(tiny_bundle):
    """A MemoryError in one row of a batch of 3 (injected) used to fail all 3: the batch is retried row by row."""
    bundle = load_bundle(tiny_bundle)
    model = InstanceModel(bundle, open_backend(bundle, "ort-cpu"))
    real = model.localizer

    class Poisoned:
        def __init__(self, localizer):
            self.inner = localizer

        def localize_batch(self, images, seeds=None):
            if any(d.width == 57 for d in images):
                raise MemoryError("injected")
            return self.inner.localize_batch(images, seeds=seeds)

    model.localizer = lambda s: Poisoned(real(s))
    odd = cv2.imencode(".png", np.zeros((40, 57, 3), np.uint8))[1].tobytes()
    answers = model([Request([_png(0), odd, _png(1)], {"seed": 1})])
    errors = [e[0].decode() for e in answers[0]["error"]]
    assert errors[0] == errors[2] == "" and "MemoryError" not in errors[1] and "injected" in errors[1]
    assert np.isfinite(answers[0]["score"][[0, 2], 0]).all() and np.isnan(answers[0]["score"][1, 0])


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("True", True), (1, True), (True, True),
                                             ("0", False), ("false", False), (0, False), (False, False)])
def test_flags_read_every_spelling_a_client_sends(tiny_bundle, value, expected):
    from diffiml.runtime.serving.server import parse_settings

    assert parse_settings({"uncertainty": value}, load_bundle(tiny_bundle)).uncertainty is expected


def test_a_batch_over_the_decoded_memory_budget_runs_in_parts_and_every_row_is_answered(tiny_bundle, monkeypatch):
    from diffiml.runtime.serving import server

    bundle = load_bundle(tiny_bundle)
    model = InstanceModel(bundle, open_backend(bundle, "ort-cpu"))
    one_image = 40 * 56 * 3
    monkeypatch.setattr(server, "BATCH_DECODED_BUDGET", 2 * one_image)  # two decoded rows at a time
    batches = []
    real = Localizer.localize_batch

    def recording(self, images, seeds=None):
        batches.append(len(images))
        return real(self, images, seeds=seeds)

    monkeypatch.setattr(Localizer, "localize_batch", recording)
    answers = model([Request([_png(i) for i in range(3)], {"seed": 4, "raw": True}), Request([_png(3)], {"seed": 4})])
    assert batches == [2, 2]
    assert all(not a["error"][r, 0] for a in answers for r in range(a["error"].shape[0]))
    alone = _local(tiny_bundle, _png(2), seed=4, steps=bundle.default_steps, ensemble=bundle.default_ensemble)
    assert np.allclose(answers[0]["raw_probability"][2], alone, atol=1e-5)


def test_a_row_whose_outputs_cannot_be_encoded_fails_alone_and_is_counted(tiny_bundle, monkeypatch):
    """An encoding failure (injected for one row) answers that row's error, the others their outputs, and the stats
    port counts it under "encode" (a kind the counters lacked: the KeyError failed the whole batch)."""
    bundle = load_bundle(tiny_bundle)
    model = InstanceModel(bundle, open_backend(bundle, "ort-cpu"))
    real = model._encode

    def poisoned(result, settings, batch, wanted):
        if result.width == 57:
            raise ValueError("injected")
        return real(result, settings, batch, wanted)

    monkeypatch.setattr(model, "_encode", poisoned)
    odd = cv2.imencode(".png", np.zeros((40, 57, 3), np.uint8))[1].tobytes()
    answers = model([Request([_png(0), odd, _png(1)], {"seed": 1})])
    errors = [e[0].decode() for e in answers[0]["error"]]
    assert errors[0] == errors[2] == "" and errors[1] == "encode failed: injected"
    assert 'diffiml_row_failures_total{kind="encode"} 1' in model.stats.prometheus()


def test_a_failing_row_alone_runs_its_inference_once(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    model = InstanceModel(bundle, open_backend(bundle, "ort-cpu"))
    calls = []

    class Failing:
        def localize_batch(self, images, seeds=None):
            calls.append(len(images))
            raise MemoryError("injected")

    model.localizer = lambda s: Failing()
    answers = model([Request([_png(0)], {"seed": 1})])
    assert calls == [1] and "injected" in answers[0]["error"][0, 0].decode()
