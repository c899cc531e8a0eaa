"""onnxruntime backend (CPU and CUDA), with IO binding and buffers allocated once per shape.

On CPU, outputs are bound to preallocated numpy arrays, so a step allocates nothing. On CUDA, the latents stay on
the device for the whole step loop (two ping-pong buffers), and a user compute stream is passed to the provider.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffiml.runtime.bundle import GraphEntry
from diffiml.runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def ort_module():  # noqa: ANN201 - the onnxruntime module
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def cuda_available() -> bool:
    try:
        return "CUDAExecutionProvider" in ort_module().get_available_providers()
    except BackendUnavailableError:
        return False


def session_options(threads: int | None = None):  # noqa: ANN201
    ort = ort_module()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    n = threads or int(os.environ.get("DIFFIML_THREADS", "0")) or None
    if n:
        opts.intra_op_num_threads = n
    return opts


class OrtEngine:
    """One graph in one onnxruntime session. Not thread-safe by itself: the Localizer serializes calls."""

    def __init__(self, graph: GraphEntry, device: str = "cpu", threads: int | None = None) -> None:
        ort = ort_module()
        self.graph, self.device = graph, device
        providers: list = ["CPUExecutionProvider"]
        if device == "cuda":
            if not cuda_available():
                raise BackendUnavailableError("ort-cuda: this onnxruntime has no CUDAExecutionProvider "
                                              "(install onnxruntime-gpu and a CUDA driver)")
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(Path(graph.path)), sess_options=session_options(threads),
                                            providers=providers)
        self.output_dtypes = {t["name"]: _NP[t["dtype"]] for t in graph.outputs}
        self._binding = self.session.io_binding()
        self._outputs: dict[str, np.ndarray] = {}
        self._shape_key: tuple | None = None

    def _output_shapes(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        sizes: dict[str, int] = {}
        for spec in self.graph.inputs:
            for dim, n in zip(spec["shape"], feeds[spec["name"]].shape, strict=True):
                if isinstance(dim, str):
                    sizes[dim] = n
        return {t["name"]: tuple(sizes[d] if isinstance(d, str) else d for d in t["shape"]) for t in self.graph.outputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(v.shape for v in feeds.values())
        if key != self._shape_key:  # (re)allocate output buffers only when the batch shape changes
            self._outputs = {n: np.empty(s, self.output_dtypes[n]) for n, s in self._output_shapes(feeds).items()}
            self._shape_key = key
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, value in feeds.items():
            b.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, buf in self._outputs.items():
            if self.device == "cpu":
                b.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            else:
                b.bind_output(name, "cuda")
        self.session.run_with_iobinding(b)
        if self.device != "cpu":
            return dict(zip(self._outputs, b.copy_outputs_to_cpu(), strict=True))
        return self._outputs


class OrtCudaStepLoop:
    """The step loop with latents resident on the GPU: per step, only the (tiny) coefficient inputs move.

    Two OrtValue buffers ping-pong between input and output. Written against onnxruntime-gpu's IO-binding API;
    not exercised on a GPU in this repository's CI (see README, "What was verified where").
    """

    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self._buffers: list = []
        self._key: tuple | None = None

    def __call__(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
                 coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray:
        ort = ort_module()
        key = (latents.shape, cond_features.shape)
        if key != self._key:
            self._buffers = [ort.OrtValue.ortvalue_from_shape_and_type(latents.shape, np.float32, "cuda", 0)
                             for _ in range(2)]
            self._cond = ort.OrtValue.ortvalue_from_shape_and_type(cond_features.shape, np.float32, "cuda", 0)
            self._key = key
        self._buffers[0].update_inplace(np.ascontiguousarray(latents, np.float32))
        self._cond.update_inplace(np.ascontiguousarray(cond_features, np.float32))
        b = self.engine.session.io_binding()
        for k in range(len(timesteps)):
            src, dst = self._buffers[k % 2], self._buffers[(k + 1) % 2]
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            b.bind_ortvalue_input("latents", src)
            b.bind_ortvalue_input("cond_features", self._cond)
            b.bind_cpu_input("timestep", timesteps[k : k + 1].astype(np.float32))
            b.bind_cpu_input("coef_x0", coef_x0[k : k + 1])
            b.bind_cpu_input("coef_xt", coef_xt[k : k + 1])
            b.bind_cpu_input("sqrt_alpha", sqrt_alpha[k : k + 1])
            b.bind_ortvalue_output("next_latents", dst)
            self.engine.session.run_with_iobinding(b)
        return self._buffers[len(timesteps) % 2].numpy()
