"""Shared fixtures: everything is the `tiny` config (64x64) so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _has_cuda_device() -> bool:
    import shutil

    from diffiml.runtime.backends.ort_backend import cuda_available

    return cuda_available() and shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, with the reason, where no CUDA device and onnxruntime-gpu are present."""
    if _has_cuda_device():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and onnxruntime-gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffiml.train.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, n=24, seed=7, size=64, holdout_type="inpaint")
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic_set: Path) -> Path:
    """A tiny DiffIML trained for a few steps (after a few LightVAE steps): a real checkpoint to export."""
    from diffiml.cli import main

    root = tmp_path_factory.mktemp("runs")
    data = str(synthetic_set / "train.json")
    common = ["--config", "tiny", "--data", data, "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2"]
    assert main(["train-vae", *common, "--out", str(root / "vae")]) == 0
    assert main(["train", *common, "--out", str(root / "diffiml"), "--vae", str(root / "vae")]) == 0
    return root / "diffiml"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    from diffiml.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_bundle(tiny_run, out)
    return out
