"""An int8 precision for CPU bundles: static QDQ quantization with onnxruntime's own quantization tools.

Calibration runs the fp32 bundle on training-style images (never the evaluation sets) and records what each graph
really receives: the encoder's images, every UNet step's latents and condition at every step, the decoder's
averaged latents. Only the arithmetic-heavy operators are quantized (Conv, MatMul, Gemm; weights per output
channel, symmetric int8; activations uint8 from min/max): everything else stays fp32, in particular the DDIM update
at the end of the UNet graph, normalizations, the attention softmax (inside the fused attention node) and the
decoder, whose sigmoid maps small latent differences to the mask. The int8 graphs are then checked against fp32 on
the calibration images' held-back part: mask agreement and max |Δp| go into the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.export.precision_check import graph_entry, record_check
from diffiml.runtime.backends import open_backend
from diffiml.runtime.backends.base import Backend, Engine, HostStepLoop
from diffiml.runtime.bundle import Bundle, load_bundle
from diffiml.runtime.localizer import Localizer

log = logging.getLogger(__name__)
QUANTIZED_GRAPHS = ("condition_encoder", "unet")  # the decoder is small and sets the mask's edges: fp32
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
MIN_MASK_AGREEMENT = 0.99


class RecordingEngine:
    """Runs an engine and keeps a copy of every feed: the calibration inputs a graph really sees."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.engine.run(feeds)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def record_calibration(bundle: Bundle, images: Sequence[Any], steps: int, ensemble: int) -> dict[str, list]:
    """Every graph's feeds while the fp32 bundle localizes ``images`` one by one (ort-cpu)."""
    fp32 = open_backend(bundle, "ort-cpu")
    recorders = {name: RecordingEngine(engine) for name, engine in fp32.engines.items()}
    backend = Backend("calibration", dict(recorders), HostStepLoop(recorders["unet"]))
    localizer = Localizer(bundle, backend, steps, ensemble, False, 0, False)
    for image in images:
        localizer.localize(image)
    return {name: r.feeds for name, r in recorders.items()}


def quantize_graph(fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32_path), str(out_path), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True})


def add_int8(bundle_dir: Path, calibration: Sequence[Any], check: Sequence[Any], steps: int | None = None,
             ensemble: int | None = None, min_agreement: float = MIN_MASK_AGREEMENT) -> dict[str, Any]:
    """Quantize ``bundle_dir``'s encoder and UNet on ``calibration`` images, check on ``check`` images, and return
    the manifest's ``precisions.int8`` entry (the files are written into the bundle folder)."""
    bundle = load_bundle(bundle_dir)
    steps, ensemble = steps or bundle.default_steps, ensemble or bundle.default_ensemble
    feeds = record_calibration(bundle, calibration, steps, ensemble)
    graphs: dict[str, Any] = {}
    for name in QUANTIZED_GRAPHS:
        fp32 = bundle.graph(name)
        out = Path(bundle_dir) / f"{name}.int8.onnx"
        quantize_graph(fp32.path, out, feeds[name])
        graphs[name] = graph_entry(out, "int8", fp32.inputs, fp32.outputs)
        log.info("%s: int8 on %d calibration feeds", name, len(feeds[name]))
    entry = {"graphs": graphs, "calibration": {"images": len(calibration), "steps": steps, "ensemble": ensemble,
                                               "method": "MinMax", "format": "QDQ", "per_channel": True,
                                               "quantized_ops": QUANTIZED_OPS}}
    agreement = record_check(bundle, "int8", entry, check, steps, ensemble)["mask_agreement_vs_fp32"]
    if agreement < min_agreement:
        raise ValueError(f"int8 masks agree with fp32 on {agreement:.4f} of pixels (< {min_agreement}); "
                         "calibrate on more representative images or keep fp32")
    return entry
