"""onnxruntime backend (CPU and CUDA), with IO binding and buffers allocated once per shape.

On CPU, outputs are bound to preallocated numpy arrays, so a step allocates nothing. On CUDA, the latents stay on
the device for the whole step loop (two ping-pong buffers), and a user compute stream is passed to the provider.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffiml.runtime.bundle import GraphEntry
from diffiml.runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def ort_module():  # noqa: ANN201 - the onnxruntime module
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'diffiml[cpu]' (or 'diffiml[gpu]' "
                                      "for onnxruntime-gpu; not both)") from exc
    return onnxruntime


# y = Relu(x), x: float[4], opset 17, IR 8: onnx.helper's serialization, kept as bytes (the runtime needs no onnx).
_RELU_PROBE = (b'\x08\x08:7\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n'
               b'\x02\x08\x04b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x04B\x04\n\x00\x10\x11')


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether onnxruntime can really run on a CUDA device here. Every onnxruntime-gpu wheel lists the CUDA provider,
    with or without a GPU, driver or CUDA libraries, and a session then falls back to the CPU silently: so run a
    one-node graph and check that the session kept the CUDA provider."""
    try:
        ort = ort_module()
    except BackendUnavailableError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: the CUDA/cuDNN libraries of the NVIDIA wheels
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - absent libraries surface as the session check below
            pass
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        session = ort.InferenceSession(_RELU_PROBE, sess_options=opts, providers=["CUDAExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":
            return False
        out = session.run(None, {"x": np.array([-1, 0, 1, 2], np.float32)})[0]
        return bool(np.array_equal(out, [0, 0, 1, 2]))
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable CUDA here
        log.info("onnxruntime lists CUDA, but a CUDA session failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return False


# fp32 on CUDA means fp32: the CUDA provider's ``use_tf32`` defaults on, which rounds matmul/conv inputs to TF32
# (10-bit mantissa) on Ampere and later and can miss the 1e-3 parity gate against the CPU. Reduced precision is
# the bundle's fp16 graphs, asked for by name.
CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0"}


def session_options(threads: int | None = None):  # noqa: ANN201
    ort = ort_module()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    n = threads or int(os.environ.get("DIFFIML_THREADS", "0")) or None
    if n:
        opts.intra_op_num_threads = n
    if os.environ.get("DIFFIML_ORT_SPINNING") == "0":
        # Worker threads sleep between parallel sections instead of spinning: a process that does other work
        # beside inference on the same cores (a server decoding and encoding images) gets those cycles back.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OrtEngine:
    """One graph in one onnxruntime session. Not thread-safe by itself: the Localizer serializes calls.

    The session is created on first use: on CUDA the UNet-step graph normally runs only in the step loop's own
    CUDA-graph session, and a second session would hold a second copy of its weights in GPU memory."""

    def __init__(self, graph: GraphEntry, device: str = "cpu", threads: int | None = None, device_id: int = 0
                 ) -> None:
        self.graph, self.device, self.threads, self.device_id = graph, device, threads, device_id
        self.providers: list = ["CPUExecutionProvider"]
        if device == "cuda":
            if not cuda_available():
                raise BackendUnavailableError("ort-cuda: onnxruntime cannot run on a CUDA device here "
                                              "(install onnxruntime-gpu and a CUDA driver)")
            self.providers = [("CUDAExecutionProvider", {**CUDA_OPTIONS, "device_id": str(device_id)}),
                              "CPUExecutionProvider"]
        self.output_dtypes = {t["name"]: _NP[t["dtype"]] for t in graph.outputs}
        self._outputs: dict[str, np.ndarray] = {}
        self._shape_key: tuple | None = None
        if device == "cpu":
            self.session  # noqa: B018 - create it now: a bad graph fails at open, not at the first image

    @functools.cached_property
    def session(self):  # noqa: ANN201 - an onnxruntime InferenceSession
        return ort_module().InferenceSession(str(Path(self.graph.path)), sess_options=session_options(self.threads),
                                             providers=self.providers)

    @functools.cached_property
    def _binding(self):  # noqa: ANN202
        return self.session.io_binding()

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
            # Preallocated host buffers on both devices: on CUDA, onnxruntime copies each output into it, instead of
            # allocating a device output and a host copy on every call.
            b.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self.session.run_with_iobinding(b)
        return self._outputs


MAX_CAPTURED_SHAPES = 8  # batch shapes whose CUDA graphs (or, without graphs, device buffers) a step loop keeps


@dataclass
class _StepPlan:
    latents: list  # two device OrtValues, ping-pong
    cond: Any
    scalars: list
    bindings: list
    first_graph_id: int  # step k replays gpu_graph_id first_graph_id + k


class OrtCudaStepLoop:
    """The step loop with latents resident on the GPU, in its own session on a user compute stream.

    Every per-step input lives in device memory prepared once per shape: two latent buffers ping-pong between input
    and output, and each step has its own timestep/coefficient buffers. Each step k is therefore a fixed set of
    addresses, which is what onnxruntime's CUDA graphs need: with ``enable_cuda_graph`` each step is captured under
    its own ``gpu_graph_id`` on first use and replayed afterwards, so the loop issues no host-to-device copy. If the
    provider refuses graphs (a node not on CUDA, an old onnxruntime), the same loop runs without them.
    Written against onnxruntime-gpu's IO-binding API; not run in this repository's CI (see README).
    """

    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.stream = None
        self.device_id = engine.device_id
        options: dict[str, str] = {**CUDA_OPTIONS, "device_id": str(self.device_id), "enable_cuda_graph": "1"}
        try:
            from diffiml.runtime.backends.cuda_memory import check, cudart

            check(cudart().cudaSetDevice(self.device_id))  # the stream belongs to the device it is created on
            self.stream = check(cudart().cudaStreamCreateWithFlags(cudart().cudaStreamNonBlocking))
            options["user_compute_stream"] = str(int(self.stream))
        except (BackendUnavailableError, RuntimeError) as exc:
            log.info("ort-cuda: no user compute stream (%s)", exc)
        self.options = options
        try:
            self.session = self._graph_session()
            self.graphs = True
        except Exception as exc:  # noqa: BLE001 - the provider's refusal is reported, then we run without graphs
            log.warning("ort-cuda: CUDA graphs unavailable (%s); running the step loop without them", exc)
            self.session, self.graphs = engine.session, False
        self._plans: dict[tuple, _StepPlan] = {}
        self._next_graph_id = 1
        # onnxruntime keeps captured CUDA graphs per calling thread: a Localizer shared by threads would capture all
        # K graphs again in each. Every call of the loop therefore runs on this one thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort-cuda-steps")

    def _graph_session(self):  # noqa: ANN202 - an onnxruntime InferenceSession
        return ort_module().InferenceSession(str(self.engine.graph.path), sess_options=session_options(),
                                             providers=[("CUDAExecutionProvider", self.options)])

    def _prepare(self, latents: np.ndarray, cond: np.ndarray, tables: np.ndarray) -> _StepPlan:
        """The device buffers, bindings and graph ids of one (batch shape, schedule), kept: a server alternating
        between batch sizes replays each size's graphs instead of rebuilding the session for every change."""
        ort = ort_module()
        key = (latents.shape, cond.shape, tables.tobytes())
        plan = self._plans.get(key)
        if plan is not None:
            self._plans[key] = self._plans.pop(key)  # most recently used last
            return plan
        if len(self._plans) >= MAX_CAPTURED_SHAPES:
            if self.graphs:
                # Captured graphs cannot be released one by one: past the bound, a fresh session drops them all.
                self.session = self._graph_session()
                self._plans.clear()
                self._next_graph_id = 1
            else:  # without graphs a plan is only buffers and bindings: drop the least recently used
                self._plans.pop(next(iter(self._plans)))
        device = lambda a: ort.OrtValue.ortvalue_from_numpy(  # noqa: E731
            np.ascontiguousarray(a, np.float32), "cuda", self.device_id)
        pair = [device(latents), device(np.empty_like(latents))]
        cond_value = device(cond)
        scalars = [[device(tables[r, k : k + 1]) for r in range(4)] for k in range(tables.shape[1])]
        bindings = []
        for k in range(tables.shape[1]):
            b = self.session.io_binding()
            b.bind_ortvalue_input("latents", pair[k % 2])
            b.bind_ortvalue_input("cond_features", cond_value)
            for name, value in zip(("timestep", "coef_x0", "coef_xt", "sqrt_alpha"), scalars[k], strict=True):
                b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output("next_latents", pair[(k + 1) % 2])
            bindings.append(b)
        plan = _StepPlan(pair, cond_value, scalars, bindings, self._next_graph_id)
        self._next_graph_id += len(bindings)
        self._plans[key] = plan
        return plan

    def __call__(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
                 coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray:
        args = (latents, cond_features, timesteps, coef_x0, coef_xt, sqrt_alpha)
        return self._thread.submit(self._run_once_or_without_graphs, *args).result()

    def close(self) -> None:
        """Stop the loop's thread, drop its sessions' graphs and buffers, and destroy its CUDA stream (last: the
        sessions ran on it)."""
        self._thread.shutdown(wait=True)
        self._plans.clear()
        self.session = None
        if self.stream is not None:
            from diffiml.runtime.backends.cuda_memory import cudart

            cudart().cudaStreamSynchronize(self.stream)
            cudart().cudaStreamDestroy(self.stream)
            self.stream = None

    def _run_once_or_without_graphs(self, *args: np.ndarray) -> np.ndarray:
        try:
            return self._run(*args)
        except Exception as exc:  # noqa: BLE001 - a capture can fail late (a new shape, memory); the loop still runs
            if not self.graphs:
                raise
            log.warning("ort-cuda: CUDA graph run failed (%s); continuing without graphs", exc)
            self.session, self.graphs = self.engine.session, False
            self._plans.clear()
            return self._run(*args)

    def _run(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
             coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray:
        ort = ort_module()
        tables = np.stack([timesteps, coef_x0, coef_xt, sqrt_alpha]).astype(np.float32)
        plan = self._prepare(latents, cond_features, tables)
        plan.latents[0].update_inplace(np.ascontiguousarray(latents, np.float32))
        plan.cond.update_inplace(np.ascontiguousarray(cond_features, np.float32))
        for k, binding in enumerate(plan.bindings):
            options = ort.RunOptions()
            if self.graphs:
                options.add_run_config_entry("gpu_graph_id", str(plan.first_graph_id + k))
            self.session.run_with_iobinding(binding, options)
        return plan.latents[len(plan.bindings) % 2].numpy()
