"""The one GPU command, run here as its dry run: the same script and steps, small, with ort-cpu standing in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DIFFIML_GPU_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry-run", str(tmp_path / "out")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    environment = json.loads((out / "environment.json").read_text())
    assert environment["cuda_usable"] in (True, False) and environment["onnxruntime"]
    check = json.loads((out / "check_mobile.json").read_text())["check"]
    assert check["fp32"]["passed"] and check["fp32"]["max_abs_probability_diff"] <= 1e-3
    assert check["fp16"]["mask_agreement"] >= 0.99  # fp16 graphs computed by the CPU provider
    for table in ("table4_tiny_b1", "table4_mobile_b1"):
        rows = json.loads((out / table / "table4.json").read_text())
        by = {(r["backend"], r["precision"]): r for r in rows}
        for key in (("torch-authors", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16")):
            assert by[key]["fps"], key
        assert all(r.get("skipped") or r["fps"] for r in rows)  # every row measured or says why not


@pytest.mark.slow
def test_gpu_script_runs_named_steps_and_goes_on_past_a_failed_one(tmp_path):
    """One device call per step: a step that fails is logged, the next still runs, the exit status counts them."""
    env = {**os.environ, "PYTHON": sys.executable, "DIFFIML_GPU_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--dry-run", str(tmp_path / "out"),
                          "no-such-step", "setup"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "step no-such-step FAILED" in log and "2 step(s), 1 failed" in log
    assert (tmp_path / "out" / "environment.json").is_file() and (tmp_path / "out" / "export_mobile.json").is_file()
