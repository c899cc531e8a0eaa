"""``diffiml bench gpu-check``: the device backend against ort-cpu fp32 on the same inputs, for every precision the
bundle carries, plus what the machine is. The GPU script (benchmarks/gpu/run.sh) runs it with ``ort-cuda``; its
dry run here runs it with ``ort-cpu`` standing in, so the same code is exercised on every machine."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.runtime.bundle import load_bundle
from diffiml.runtime.localizer import Localizer
from diffiml.runtime.metrics import map_agreement

FP32_MAX_ABS = 1e-3  # ort-cuda fp32 against ort-cpu fp32 (issue 13)
FP16_MIN_AGREEMENT = 0.995  # fp16 masks against fp32 masks


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    from diffiml.runtime.backends.ort_backend import cuda_available

    env: dict[str, Any] = {"python": platform.python_version(), "onnxruntime": ort.__version__,
                           "providers_listed": ort.get_available_providers(), "cuda_usable": cuda_available()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = None
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return env


def compare(bundle_dir: str | Path, device_backend: str, images: list[np.ndarray], steps: int | None = None,
            ensemble: int | None = None) -> dict[str, Any]:
    """Per precision: max |Δp| and mask agreement of ``device_backend`` against ort-cpu fp32, and pass/fail."""
    bundle = load_bundle(bundle_dir)
    # The graphs are compared: the copy-move cue (the same CPU code on both sides) is left out.
    reference = Localizer.open(bundle_dir, backend="ort-cpu", steps=steps, ensemble=ensemble, copy_move=False)
    expected = [reference.localize(im).model_probability for im in images]
    report: dict[str, Any] = {"bundle": str(bundle_dir), "device_backend": device_backend, "images": len(images)}
    for precision in bundle.precisions:
        if precision == "int8":
            continue  # a CPU precision
        try:
            loc = Localizer.open(bundle_dir, backend=device_backend, steps=steps, ensemble=ensemble,
                                 precision=precision, copy_move=False)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the other precisions still run
            report[precision] = {"skipped": str(exc)}
            continue
        agreement, max_abs = map_agreement(expected, [loc.localize(im).model_probability for im in images])
        passed = max_abs <= FP32_MAX_ABS if precision == "fp32" else agreement >= FP16_MIN_AGREEMENT
        report[precision] = {"backend": loc.backend, "max_abs_probability_diff": max_abs,
                             "mask_agreement": agreement, "passed": passed}
    return report


def sample_images(extra: list[Path], count: int = 3, size: int = 320) -> list[np.ndarray]:
    from diffiml.runtime.image_io import load_image

    rng = np.random.default_rng(0)
    images = [load_image(p).rgb for p in extra if p.is_file()]
    images += [rng.integers(0, 256, (size, size + 32, 3), dtype=np.uint8) for _ in range(count)]
    return images
