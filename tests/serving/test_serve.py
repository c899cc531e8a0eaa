"""A real Triton server on 127.0.0.1 with the default bundle, real requests through tritonclient.

These run in the serving environment (`make serve-env`: PyTriton's stub needs numpy < 2); `make test` runs them
there, and they skip in the main environment."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving tests run in .venv-serve (make serve-env)")
pytest.importorskip("tritonclient", reason="serving tests run in .venv-serve (make serve-env)")

from diffiml.benchmarks import serve_load as load
from diffiml.benchmarks.serve_process import ServerProcess
from diffiml.runtime.localizer import Localizer
from diffiml.runtime.serving.client import ServerError, TritonLocalizer

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "engines" / "default"
SAMPLE = REPO / "examples" / "sample_splice.png"
FAST = {"steps": 2, "ensemble": 2}  # a schedule the bundle carries; keeps each request short on 2 cores


def bad_inputs() -> dict[str, bytes]:
    return load.bad_inputs(SAMPLE.read_bytes())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("the default bundle is built by `make bundle`")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(BUNDLE, "--max-batch", "4", "--max-queue-delay-ms", "20", log_path=log) as s:
        yield s
    assert s.returncode == 0, log.read_text()[-2000:]
    assert s.group_gone(), "tritonserver or its stub outlived the server"


@pytest.fixture(scope="module")
def local() -> Localizer:
    return Localizer.open(BUNDLE, backend="ort-cpu", steps=FAST["steps"], ensemble=FAST["ensemble"], seed=3)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_result_equals_local(server: ServerProcess, local: Localizer, protocol: str) -> None:
    url = f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"
    client = TritonLocalizer(url, seed=3, **FAST)
    answer = client.localize_bytes(SAMPLE.read_bytes())
    expected = local.localize(SAMPLE)
    np.testing.assert_allclose(answer.result.model_probability, expected.model_probability, atol=1e-5)
    assert np.array_equal(answer.result.mask, expected.mask)
    assert answer.result.score == pytest.approx(expected.score, abs=1e-5)
    assert (answer.result.height, answer.result.width) == (expected.height, expected.width)
    other_seed = TritonLocalizer(url, seed=4, **FAST).localize_bytes(SAMPLE.read_bytes())
    assert not np.allclose(other_seed.result.model_probability, expected.model_probability, atol=1e-5)


def test_bad_inputs_fail_alone_under_concurrency(server: ServerProcess, local: Localizer) -> None:
    """Good and bad requests sent at once (Triton batches them together): every bad one gets its own one-line
    error, every good one the local result."""
    expected = local.localize(SAMPLE).model_probability
    jobs = [("good", SAMPLE.read_bytes())] * 4 + list(bad_inputs().items())
    outcomes: dict[int, object] = {}

    def send(i: int, data: bytes) -> None:
        try:
            outcomes[i] = TritonLocalizer(f"http://{server.http_url}", seed=3, **FAST).localize_bytes(data)
        except ServerError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i, data)) for i, (_, data) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (kind, _) in enumerate(jobs):
        outcome = outcomes[i]
        if kind == "good":
            assert not isinstance(outcome, Exception), outcome
            np.testing.assert_allclose(outcome.result.model_probability, expected, atol=1e-4)
        else:
            assert isinstance(outcome, ServerError), (kind, outcome)
            message = str(outcome)
            assert "\n" not in message and "Traceback" not in message
            assert ("exceeds the limit" in message) if kind == "huge" else ("empty" in message or
                                                                           "not a decodable" in message)


def test_bad_parameters_are_refused(server: ServerProcess) -> None:
    with pytest.raises(ServerError, match="steps=3"):
        TritonLocalizer(f"http://{server.http_url}", steps=3).localize_bytes(SAMPLE.read_bytes())
    with pytest.raises(ServerError, match="ensemble"):
        TritonLocalizer(f"http://{server.http_url}", ensemble=0).localize_bytes(SAMPLE.read_bytes())


def test_cli_client_writes_the_same_files_as_local(server: ServerProcess, tmp_path: Path) -> None:
    common = [str(SAMPLE), "--steps", "2", "--ensemble", "2", "--seed", "3", "--uncertainty", "--bundle", str(BUNDLE)]
    cli = [sys.executable, "-m", "diffiml.cli", "localize"]
    remote = subprocess.run([*cli, *common, "--out", str(tmp_path / "remote"), "--server",
                             f"grpc://{server.grpc_url}"], capture_output=True, text=True, timeout=120)
    here = subprocess.run([*cli, *common, "--out", str(tmp_path / "local")], capture_output=True, text=True,
                          timeout=120)
    assert remote.returncode == 0 and here.returncode == 0, remote.stderr + here.stderr
    record = json.loads(remote.stdout.splitlines()[-1])
    assert record["backend"].endswith(f"@grpc://{server.grpc_url}")
    for kind in ("mask", "prob", "overlay", "uncertainty"):
        a = cv2.imread(str(tmp_path / "remote" / f"sample_splice_{kind}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "local" / f"sample_splice_{kind}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b), kind


def test_metrics_count_requests(server: ServerProcess) -> None:
    import urllib.request

    TritonLocalizer(f"http://{server.http_url}", **FAST).localize_bytes(SAMPLE.read_bytes())
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines() if x.startswith('nv_inference_request_success{model="diffiml"'))
    assert float(line.split()[-1]) >= 1


def test_sigterm_finishes_in_flight_request(tmp_path: Path) -> None:
    """SIGTERM while a long request runs: the request completes, the server exits 0, nothing is left. (Two model
    instances, so that path starts and stops too.)"""
    with ServerProcess(BUNDLE, "--instances", "2", log_path=tmp_path / "log") as server:
        client = TritonLocalizer(f"http://{server.http_url}", steps=8, ensemble=12)
        done: dict[str, object] = {}
        worker = threading.Thread(target=lambda: done.update(answer=client.localize_bytes(SAMPLE.read_bytes())))
        worker.start()
        threading.Event().wait(1.0)  # the request is in the model by now (one takes seconds at N = 12)
        assert server.stop() == 0
        worker.join(timeout=60)
        assert "answer" in done
        assert server.group_gone(), "tritonserver or its stub outlived the server"


@pytest.mark.parametrize("make_bundle", ["missing", "tampered"])
def test_bad_bundle_refuses_to_start(tmp_path: Path, make_bundle: str) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    if make_bundle == "tampered":
        shutil.copytree(BUNDLE, bundle)
        with open(bundle / "unet.onnx", "ab") as f:
            f.write(b"x")
    run = subprocess.run([sys.executable, "-m", "diffiml.cli", "serve", "--bundle", str(bundle), "--port", "18950"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffiml serve: error:"), run.stderr
