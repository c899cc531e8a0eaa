"""The TensorRT step loop's logic on stand-ins for the CUDA runtime and the UNet engine (no GPU, no TensorRT here):
K steps ping-pong to the right buffer for odd and even K, every per-step scalar sits on a 256-byte boundary, a
shape seen before replays its captured graph, the cache is bounded, and a failed capture leaves no stream capturing
and no buffer behind."""

import ctypes
import types

import numpy as np
import pytest

from diffiml.runtime.backends import cuda_memory, tensorrt_backend
from diffiml.runtime.backends.cuda_memory import DeviceBuffer
from diffiml.runtime.backends.tensorrt_backend import MAX_CAPTURED_SHAPES, SCALAR_SLOT, TrtStepLoop

OK = "ok"


class FakeCuda:
    """Device memory as bytearrays at fake addresses, pinned host memory as real ctypes buffers, graphs as lists of
    recorded enqueues replayed in order."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=OK)
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="local")

    def __init__(self):
        self.device, self.host, self.next = {}, {}, 1 << 20
        self.capturing, self.recorded, self.graphs, self.captures = False, None, {}, 0

    def cudaMalloc(self, n):
        addr, self.next = self.next, self.next + ((n + 255) // 256) * 256 + 256
        self.device[addr] = bytearray(n)
        return OK, addr

    def cudaMallocHost(self, n):
        buf = ctypes.create_string_buffer(n)
        self.host[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    def cudaFree(self, addr):
        self.device.pop(addr)  # KeyError on a double free
        return (OK,)

    def cudaFreeHost(self, addr):
        self.host.pop(addr)
        return (OK,)

    def region(self, addr, n):
        base = max(a for a in self.device if a <= addr)
        return self.device[base], addr - base

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == "h2d":
            mem, off = self.region(dst, n)
            mem[off : off + n] = ctypes.string_at(src, n)
        else:
            mem, off = self.region(src, n)
            ctypes.memmove(dst, bytes(mem[off : off + n]), n)
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing, self.recorded = True, []
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        self.captures += 1
        return OK, list(self.recorded)

    def cudaGraphInstantiate(self, graph, flags):
        handle = 1000 + self.captures  # one instance per capture here
        self.graphs[handle] = graph
        return OK, handle

    def cudaGraphDestroy(self, graph):
        return (OK,)

    def cudaGraphExecDestroy(self, handle):
        del self.graphs[handle]
        return (OK,)

    def cudaGraphLaunch(self, handle, stream):
        for step in self.graphs[handle]:
            step()
        return (OK,)

    def read(self, addr, n, dtype=np.float32):
        mem, off = self.region(addr, n * 4)
        return np.frombuffer(bytes(mem[off : off + n * 4]), dtype)

    def write(self, addr, values):
        data = np.asarray(values, np.float32).tobytes()
        mem, off = self.region(addr, len(data))
        mem[off : off + len(data)] = data


class FakeUnet:
    """The UNet-step engine: next = coef_x0 * latents + timestep (one scalar of each, read from its address)."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.ctx = types.SimpleNamespace(stream=7, synchronize=lambda: None, close=lambda: None,
                                         use_device=lambda: None)
        self.addresses, self.buffers, self.by_shape, self.fail_enqueue = {}, {}, {}, False
        self.context = types.SimpleNamespace(set_tensor_address=self._set)

    def _set(self, name, address):
        self.addresses[name] = address
        return True

    def bind(self, shapes):
        key = (shapes["latents"], shapes["cond_features"])
        if key not in self.by_shape:
            self.by_shape[key] = {n: DeviceBuffer(shapes[n], np.dtype(np.float32))
                                  for n in ("latents", "cond_features")}
        self.buffers = self.by_shape[key]
        return True

    def enqueue(self):
        if self.fail_enqueue and self.cuda.capturing:
            raise RuntimeError("TensorRT: unet failed to enqueue")
        a, cuda, n = dict(self.addresses), self.cuda, self.buffers["latents"].host.size

        def step():
            t, c0 = cuda.read(a["timestep"], 1)[0], cuda.read(a["coef_x0"], 1)[0]
            cuda.write(a["next_latents"], cuda.read(a["latents"], n) * c0 + t)

        (cuda.recorded.append if cuda.capturing else lambda f: f())(step)


@pytest.fixture
def cuda(monkeypatch):
    import gc

    fake = FakeCuda()
    monkeypatch.setattr(cuda_memory, "cudart", lambda: fake)
    monkeypatch.setattr(tensorrt_backend, "cudart", lambda: fake)
    yield fake
    gc.collect()  # buffers of this test are freed (by their finalizers) while this fake is still in place


def _run(loop, shape, k, seed=0):
    z = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    schedule = np.random.default_rng(k)  # one schedule per K, as a bundle has
    t, c0 = schedule.uniform(0, 1, k).astype(np.float32), schedule.uniform(0.5, 1.5, k).astype(np.float32)
    expected = z.copy()
    for i in range(k):
        expected = expected * c0[i] + t[i]
    got = loop(z, np.zeros((1, 4, 2, 2), np.float32), t, c0, np.zeros(k, np.float32), np.zeros(k, np.float32))
    return got, expected


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_k_steps_end_in_the_right_buffer_with_aligned_scalars(cuda, k):
    unet = FakeUnet(cuda)
    loop = TrtStepLoop(unet)
    got, expected = _run(loop, (2, 8, 2, 2), k)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for name in ("timestep", "coef_x0", "coef_xt", "sqrt_alpha"):
        assert unet.addresses[name] % SCALAR_SLOT == 0


def test_a_shape_seen_before_replays_and_the_cache_is_bounded(cuda):
    loop = TrtStepLoop(FakeUnet(cuda))
    _run(loop, (2, 8, 2, 2), 4)
    _run(loop, (2, 8, 2, 2), 4, seed=1)
    assert cuda.captures == 1  # replayed, not captured again
    for members in range(3, 3 + MAX_CAPTURED_SHAPES):
        _run(loop, (members, 8, 2, 2), 4)
    assert cuda.captures == 1 + MAX_CAPTURED_SHAPES and len(cuda.graphs) == MAX_CAPTURED_SHAPES
    got, expected = _run(loop, (2, 8, 2, 2), 4, seed=2)  # evicted: captured again, still right
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    loop.close()
    assert not cuda.graphs


def test_a_failed_capture_ends_the_capture_and_frees_its_buffers(cuda):
    unet = FakeUnet(cuda)
    loop = TrtStepLoop(unet)
    _run(loop, (2, 8, 2, 2), 2)
    before = set(cuda.device)
    unet.fail_enqueue = True
    with pytest.raises(RuntimeError, match="failed to enqueue"):
        _run(loop, (3, 8, 2, 2), 2)
    assert not cuda.capturing
    kept = set(cuda.device) - before  # only the UNet's buffers for the new shape, nothing of the failed capture
    assert len(kept) == 2
