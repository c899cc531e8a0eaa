"""Small helpers over cuda-python's runtime bindings (``cuda.bindings.runtime``, cuda-python >= 12.6; the old
``from cuda import cudart`` is gone in 13): checked calls, device buffers, pinned host arrays."""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

from diffiml.runtime.errors import BackendUnavailableError


def cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise BackendUnavailableError("cuda-python is not installed: pip install 'cuda-python>=12.6'") from exc
    return runtime


def device_count() -> int:
    """CUDA devices this process sees; 0 without cuda-python or a driver."""
    try:
        return int(check(cudart().cudaGetDeviceCount()))
    except (BackendUnavailableError, RuntimeError):
        return 0


def check(result: Any) -> Any:
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def _free_pair(device: int, host: int) -> None:
    rt = cudart()
    rt.cudaFree(device)
    rt.cudaFreeHost(host)


class DeviceBuffer:
    """Device memory of one array shape, with a pinned host mirror for async copies. Freed by ``free()`` or, failing
    that, when the buffer is collected (a finalizer), never twice. Device allocations are 256-byte aligned."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = max(1, int(np.prod(shape)) * self.dtype.itemsize)
        self.device = int(check(cudart().cudaMalloc(self.nbytes)))
        try:
            self._host_ptr = int(check(cudart().cudaMallocHost(self.nbytes)))
        except RuntimeError:
            cudart().cudaFree(self.device)
            raise
        self._finalizer = weakref.finalize(self, _free_pair, self.device, self._host_ptr)
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self._host_ptr))
        self.host = raw.view(self.dtype)[: int(np.prod(shape))].reshape(shape)

    def upload(self, value: np.ndarray, stream: Any) -> None:
        self.host[...] = value
        rt = cudart()
        check(rt.cudaMemcpyAsync(self.device, self._host_ptr, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, stream: Any) -> np.ndarray:
        rt = cudart()
        check(rt.cudaMemcpyAsync(self._host_ptr, self.device, self.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        return self.host

    def free(self) -> None:
        if self._finalizer.alive:
            self._finalizer()
        self.device = 0
