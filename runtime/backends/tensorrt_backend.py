"""TensorRT 10 backend: ``execute_async_v3`` on one non-default CUDA stream, pinned host memory, async copies,
one activation pool shared by the three engines, and the whole K-step loop captured once as a CUDA graph and
replayed (dropped and re-captured whenever buffers are reallocated, since a graph holds raw addresses).

Written against the TensorRT 10 Python API and checked statically (mypy + tensorrt-stubs). TensorRT cannot be
installed on this project's machines, so this module has not run; see README, "What was verified where".
"""

from __future__ import annotations

import platform
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffiml.runtime.backends.cuda_memory import DeviceBuffer, check, cudart
from diffiml.runtime.bundle import GRAPH_NAMES, Bundle, verify_file
from diffiml.runtime.errors import BackendUnavailableError, BundleError

# numpy has no bfloat16: an engine whose I/O tensors are BF16 is refused (build-engines keeps I/O in fp32).
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}


def unavailable_reason() -> str | None:
    try:
        import tensorrt

        complete = hasattr(tensorrt, "Builder")
    except ImportError:
        complete = False
    if not complete:  # tensorrt-stubs alone leaves an empty namespace package named tensorrt
        return "TensorRT is not installed (pip install tensorrt needs NVIDIA's package index)"
    try:
        if int(check(cudart().cudaGetDeviceCount())) < 1:
            return "no CUDA device"
    except (BackendUnavailableError, RuntimeError) as exc:
        return str(exc)
    return None


def available() -> bool:
    return unavailable_reason() is None


def device_identity(device_id: int = 0) -> dict[str, str]:
    """The GPU and TensorRT version an engine is bound to."""
    import tensorrt as trt

    props = check(cudart().cudaGetDeviceProperties(device_id))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"compute_capability": f"{props.major}.{props.minor}", "device_name": name.strip("\x00"),
            "tensorrt_version": trt.__version__, "platform": platform.machine()}


def select_engines(bundle: Bundle, identity: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The bundle's engine entries for this GPU and TensorRT version, or a BundleError naming both sides."""
    entries = bundle.manifest.get("engines", [])
    if not entries:
        raise BundleError(f"{bundle.root}: no TensorRT engines; build them with `diffiml build-engines`")
    mine = {e["graph"]: e for e in entries if e["compute_capability"] == identity["compute_capability"]
            and e["tensorrt_version"] == identity["tensorrt_version"]}
    if set(mine) != set(bundle.graph_names):
        built = sorted({(e["device_name"], e["compute_capability"], e["tensorrt_version"]) for e in entries})
        raise BundleError(
            f"{bundle.root}: engines were built for {built} but this machine has {identity['device_name']} "
            f"(compute capability {identity['compute_capability']}) with TensorRT {identity['tensorrt_version']}; "
            "rebuild them here with `diffiml build-engines`")
    return mine


class TrtContext:
    """Engines of one bundle on one stream, sharing one activation pool."""

    def __init__(self, bundle: Bundle, device_id: int = 0) -> None:
        import tensorrt as trt

        entries = select_engines(bundle, device_identity(device_id))  # refuse a bundle before touching the GPU
        self.device_id = device_id
        self.closed = False
        self.use_device()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = check(cudart().cudaStreamCreateWithFlags(cudart().cudaStreamNonBlocking))
        # The engines' optimization profiles end at twice the built batch (room for flip TTA's copies; see
        # export/tensorrt_build.py:batch_profile); a larger request is refused before it runs.
        self.max_images = 2 * min(int(e["max_images"]) for e in entries.values())
        self.max_members = 2 * min(int(e["max_members"]) for e in entries.values())
        self.engines: dict[str, Any] = {}
        self.users: list[TrtEngine] = []  # the TrtEngines on this context, closed with it
        for name, entry in entries.items():
            path = bundle.root / entry["file"]
            verify_file(path, entry["sha256"])
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"{path}: TensorRT could not deserialize this engine")
            self.engines[name] = engine
        pool = max(e.device_memory_size_v2 for e in self.engines.values())
        self.pool = int(check(cudart().cudaMalloc(max(pool, 1))))
        self.contexts = {}
        for name, engine in self.engines.items():
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx.set_device_memory(self.pool, engine.device_memory_size_v2)
            self.contexts[name] = ctx

    def use_device(self) -> None:
        """Make this context's GPU current for the calling thread: CUDA's current device is per thread, and the
        server's instances call from threads of their own."""
        check(cudart().cudaSetDevice(self.device_id))

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        """Free every engine's buffers, the activation pool and the stream (contexts and engines go first). Once:
        the teacher's and each student's step loop close the context they share."""
        if self.closed:
            return
        self.closed = True
        self.synchronize()
        for user in self.users:
            user.close()
        self.contexts.clear()
        self.engines.clear()
        if self.pool:
            cudart().cudaFree(self.pool)
            self.pool = 0
        cudart().cudaStreamDestroy(self.stream)


class TrtEngine:
    """One engine behind the backend interface: host arrays in, host arrays out, buffers kept per shape."""

    def __init__(self, ctx: TrtContext, name: str) -> None:
        self.ctx, self.name = ctx, name
        ctx.users.append(self)
        self.engine, self.context = ctx.engines[name], ctx.contexts[name]
        trt = ctx.trt
        self.inputs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                       if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT]
        self.outputs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                        if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
        self.buffers: dict[str, DeviceBuffer] = {}
        # Buffers per input-shape key, kept: the decoder alternates between V and V*N latents when uncertainty is
        # asked for, and reallocating on every switch would free the pinned memory that earlier results point into.
        self._by_shape: dict[tuple, dict[str, DeviceBuffer]] = {}
        self.shape_key: tuple | None = None

    def dtype(self, tensor: str) -> np.dtype:
        kind = self.engine.get_tensor_dtype(tensor).name
        if kind not in _NP:
            raise BundleError(f"{self.name}: tensor {tensor} is {kind} in the engine; the runtime feeds and reads "
                              "fp32 (rebuild with `diffiml build-engines`, which keeps inputs and outputs fp32)")
        return np.dtype(_NP[kind])

    def check_batch(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a batch beyond the engines' profiles with a line that says how to rebuild them."""
        role = "unet" if self.name.startswith("unet") else self.name  # a distilled UNet (unet_k2) is a UNet too
        images = {"condition_encoder": "image", "unet": "cond_features"}.get(role)
        members = {"unet": "latents", "mask_decoder": "latents"}.get(role)
        for tensor, limit, what in ((images, self.ctx.max_images, "images"),
                                    (members, self.ctx.max_members, "latents (images x members)")):
            if tensor is not None and shapes[tensor][0] > limit:
                raise BundleError(f"{self.name}: a batch of {shapes[tensor][0]} {what} exceeds the TensorRT "
                                  f"engines' maximum of {limit}; rebuild with a larger `diffiml build-engines "
                                  "--max-batch/--ensemble`, or localize fewer images at once")

    def bind(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Set input shapes and (re)allocate buffers if they changed; True when addresses changed."""
        key = tuple(shapes[n] for n in self.inputs)
        if key == self.shape_key:
            return False
        self.check_batch(shapes)
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise BundleError(f"{self.name}: TensorRT refused input shape {shapes[name]} for {name}")
        if key not in self._by_shape:
            buffers = {n: DeviceBuffer(shapes[n], self.dtype(n)) for n in self.inputs}
            for n in self.outputs:
                buffers[n] = DeviceBuffer(tuple(self.context.get_tensor_shape(n)), self.dtype(n))
            self._by_shape[key] = buffers
        self.buffers = self._by_shape[key]
        for n, buf in self.buffers.items():
            if not self.context.set_tensor_address(n, buf.device):
                raise RuntimeError(f"TensorRT: {self.name} refused the address of {n}")
        self.shape_key = key
        return True

    def close(self) -> None:
        for buffers in self._by_shape.values():
            for buf in buffers.values():
                buf.free()
        self._by_shape.clear()
        self.buffers = {}
        self.shape_key = None

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(int(self.ctx.stream)):
            raise RuntimeError(f"TensorRT: {self.name} failed to enqueue")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.ctx.use_device()
        self.bind({n: tuple(v.shape) for n, v in feeds.items()})
        for n, v in feeds.items():
            self.buffers[n].upload(v.astype(self.buffers[n].dtype, copy=False), self.ctx.stream)
        self.enqueue()
        out = {n: self.buffers[n].download(self.ctx.stream) for n in self.outputs}
        self.ctx.synchronize()
        return out


SCALAR_SLOT = 256  # bytes between per-step scalars on the device: TensorRT wants 256-byte aligned tensor addresses
MAX_CAPTURED_SHAPES = 8  # captured step-loop graphs kept (least recently used go first)


@dataclass
class _Captured:
    """One captured K-step loop: its graph and the device buffers only it uses (the schedule, the pong latents)."""

    graph_exec: Any
    table: DeviceBuffer
    pong: DeviceBuffer

    def release(self) -> None:
        cudart().cudaGraphExecDestroy(self.graph_exec)
        self.table.free()
        self.pong.free()


class TrtStepLoop:
    """All K UNet steps as one CUDA graph: latents ping-pong between two device buffers, and every per-step input
    (timestep and coefficients) is precomputed on the device, each in its own 256-byte slot; the loop does no host
    math and no sync. One graph per (batch shape, schedule) is kept, so a server alternating batch sizes replays
    instead of capturing again (the UNet engine keeps each shape's buffers, whose addresses the graph holds)."""

    def __init__(self, unet: TrtEngine) -> None:
        self.unet = unet
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    def _prepare(self, latents: np.ndarray, cond: np.ndarray, tables: np.ndarray) -> _Captured:
        shapes = {"latents": latents.shape, "cond_features": cond.shape, "timestep": (1,), "coef_x0": (1,),
                  "coef_xt": (1,), "sqrt_alpha": (1,)}
        self.unet.bind(shapes)  # this shape's kept buffers (allocated on first use)
        key = (latents.shape, cond.shape, tables.tobytes())
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        if len(self._graphs) >= MAX_CAPTURED_SHAPES:
            self._graphs.popitem(last=False)[1].release()
        captured = self._capture(latents.shape, tables)
        self._graphs[key] = captured
        return captured

    def _capture(self, shape: tuple[int, ...], tables: np.ndarray) -> _Captured:
        rt, stream = cudart(), self.unet.ctx.stream
        k = tables.shape[1]
        slot = SCALAR_SLOT // 4
        host = np.zeros((4 * k, slot), np.float32)
        host[:, 0] = tables.reshape(-1)  # row r * k + i holds scalar r of step i
        table = DeviceBuffer(host.shape, np.dtype(np.float32))
        pong = DeviceBuffer(shape, np.dtype(np.float32))
        try:
            table.upload(host, stream)
            self._enqueue_loop(k, table, pong)  # warm-up run outside capture: TensorRT's first launch may allocate
            check(rt.cudaStreamSynchronize(stream))
            check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            graph = None
            try:
                self._enqueue_loop(k, table, pong)
            finally:  # never leave the stream capturing, whatever failed inside
                graph = check(rt.cudaStreamEndCapture(stream))
            try:
                graph_exec = check(rt.cudaGraphInstantiate(graph, 0))
            finally:
                rt.cudaGraphDestroy(graph)
        except BaseException:
            table.free()
            pong.free()
            raise
        return _Captured(graph_exec, table, pong)

    def close(self) -> None:
        """Free the captured graphs and their buffers, then every engine's buffers and the shared context."""
        while self._graphs:
            self._graphs.popitem()[1].release()
        self.unet.ctx.close()

    def _enqueue_loop(self, k: int, table: DeviceBuffer, pong_buffer: DeviceBuffer) -> None:
        ctx = self.unet.context
        ping, pong = self.unet.buffers["latents"].device, pong_buffer.device
        for i in range(k):
            src, dst = (ping, pong) if i % 2 == 0 else (pong, ping)
            addresses = {"latents": src, "next_latents": dst}
            for r, name in enumerate(("timestep", "coef_x0", "coef_xt", "sqrt_alpha")):
                addresses[name] = table.device + SCALAR_SLOT * (r * k + i)
            for name, address in addresses.items():
                if not ctx.set_tensor_address(name, address):
                    raise RuntimeError(f"TensorRT: the UNet step refused the address of {name} at step {i}")
            self.unet.enqueue()

    def __call__(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
                 coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray:
        stream = self.unet.ctx.stream
        self.unet.ctx.use_device()
        tables = np.stack([timesteps, coef_x0, coef_xt, sqrt_alpha]).astype(np.float32)
        captured = self._prepare(latents, cond_features, tables)
        self.unet.buffers["latents"].upload(latents, stream)
        self.unet.buffers["cond_features"].upload(cond_features, stream)
        check(cudart().cudaGraphLaunch(captured.graph_exec, stream))
        final = self.unet.buffers["latents"] if len(timesteps) % 2 == 0 else captured.pong
        out = final.download(stream)
        self.unet.ctx.synchronize()
        return np.array(out, copy=True)


def open_engines(bundle: Bundle, device_id: int = 0
                 ) -> tuple[dict[str, TrtEngine], TrtStepLoop, dict[str, TrtStepLoop]]:
    """The three engines, the teacher's step loop, and a step loop per distilled UNet (all on one context)."""
    ctx = TrtContext(bundle, device_id)
    engines = {name: TrtEngine(ctx, name) for name in GRAPH_NAMES}
    students = {name: TrtStepLoop(TrtEngine(ctx, name)) for name in bundle.unet_graphs[1:]}
    return engines, TrtStepLoop(engines["unet"]), students
