"""Backend choice, in one place: ``open_backend(bundle, kind)`` returns the engines and step loop of one backend.

``auto`` tries tensorrt, then ort-cuda, then ort-cpu, and moves on when one is not installed, has no device, or
cannot serve this bundle (no engines built for this GPU, operators TensorRT does not read); it logs what it chose and
why it passed over the others (also kept in ``Backend.skipped``).
"""

from __future__ import annotations

import logging

from diffiml.runtime.backends.base import Backend, HostStepLoop
from diffiml.runtime.bundle import GRAPH_NAMES, Bundle
from diffiml.runtime.errors import BackendUnavailableError, BundleError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "tensorrt")
AUTO_ORDER = ("tensorrt", "ort-cuda", "ort-cpu")


def open_backend(bundle: Bundle, kind: str = "auto", threads: int | None = None, precision: str = "fp32",
                 device_id: int = 0) -> Backend:
    """The backend ``kind`` for ``bundle``'s graphs at ``precision`` (on GPU ``device_id`` for the CUDA backends);
    BackendUnavailableError (or BundleError) when it cannot serve them."""
    if kind not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    bundle.graph(GRAPH_NAMES[0], precision)  # BundleError now if the bundle lacks that precision
    if kind != "auto":
        return _open(bundle, kind, threads, precision, device_id)
    skipped: dict[str, str] = {}
    for name in AUTO_ORDER:
        try:
            backend = _open(bundle, name, threads, precision, device_id)
        except (BackendUnavailableError, BundleError) as exc:
            skipped[name] = str(exc)
            continue
        backend.skipped = skipped
        why = "; ".join(skipped.values())  # each reason starts with its backend's name
        log.info("backend auto: %s%s", name, f" (skipped {why})" if why else "")
        return backend
    raise BackendUnavailableError(f"no backend can run this bundle: {'; '.join(skipped.values())}")


def _open(bundle: Bundle, name: str, threads: int | None, precision: str, device_id: int = 0) -> Backend:
    if name == "tensorrt":
        if precision != "fp32":
            raise BackendUnavailableError(f"tensorrt: engines get their precision from build-engines; the {precision} "
                                          "ONNX graphs are for onnxruntime")
        from diffiml.runtime.backends import tensorrt_backend

        reason = tensorrt_backend.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"tensorrt: {reason}")
        engines, loop, students = tensorrt_backend.open_engines(bundle, device_id)
        return Backend(name, dict(engines), loop, student_loops=dict(students))
    from diffiml.runtime.backends.ort_backend import OrtCudaStepLoop, OrtEngine, cuda_available

    device = "cuda" if name == "ort-cuda" else "cpu"
    if device == "cuda" and not cuda_available():
        raise BackendUnavailableError("ort-cuda: onnxruntime cannot run on a CUDA device here (it needs "
                                      "onnxruntime-gpu, a GPU, its driver and the CUDA libraries)")
    engines = {g: OrtEngine(bundle.graph(g, precision), device, threads, device_id) for g in GRAPH_NAMES}
    loop_of = OrtCudaStepLoop if device == "cuda" else HostStepLoop
    students = {g: loop_of(OrtEngine(bundle.graph(g, precision), device, threads, device_id))
                for g in bundle.unet_graphs[1:]}
    return Backend(name, dict(engines), loop_of(engines["unet"]), student_loops=dict(students))
