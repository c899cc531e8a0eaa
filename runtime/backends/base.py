"""The interface every inference backend implements: an engine per graph, and a step loop for the K UNet steps."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Engine(Protocol):
    """One loaded graph. ``run`` takes host arrays by input name and returns host arrays by output name.

    Implementations keep their buffers between calls of the same shapes; the returned arrays may be those
    buffers, so a caller copies what it must keep past the next call.
    """

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class StepLoop(Protocol):
    """The whole denoising loop: K calls of the UNet-step graph, each feeding the next. Backends that can do better
    than one host round trip per step (device-resident latents, captured CUDA graphs) bring their own."""

    def __call__(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
                 coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray: ...


class HostStepLoop:
    """The step loop with latents on the host: one ``run`` of the UNet-step engine per step (any backend)."""

    def __init__(self, unet: Engine) -> None:
        self.unet = unet

    def __call__(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
                 coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray:
        z = latents
        k_last = len(timesteps) - 1
        for k in range(len(timesteps)):
            z = self.unet.run({"latents": z, "cond_features": cond_features, "timestep": timesteps[k : k + 1],
                               "coef_x0": coef_x0[k : k + 1], "coef_xt": coef_xt[k : k + 1],
                               "sqrt_alpha": sqrt_alpha[k : k + 1]})["next_latents"]
            z = z.copy() if k < k_last else z  # the engine reuses its output buffer as the next call's output
        return np.array(z, copy=True)


@dataclass
class Backend:
    """What ``open_backend`` returns: the three engines and the step loop of one backend.

    ``lock`` guards the engines' reused buffers: it lives here, with the buffers, so that every ``Localizer`` built
    on one backend (serving builds one per setting) takes the same lock. ``close`` frees device resources (streams,
    captured graphs, device buffers) once; a closed backend refuses to run."""

    name: str  # "ort-cpu", "ort-cuda" or "tensorrt"
    engines: dict[str, Engine]
    step_loop: StepLoop
    skipped: dict[str, str] = field(default_factory=dict)  # backends ``auto`` passed over, and why
    # The step loops of the bundle's distilled UNets by graph name (``unet_k2``); the teacher's is ``step_loop``.
    student_loops: dict[str, StepLoop] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    closed: bool = False

    def loop_for(self, unet_graph: str) -> StepLoop:
        """The step loop running ``unet_graph`` (``Bundle.unet_graph(steps)``)."""
        if unet_graph == "unet":
            return self.step_loop
        if unet_graph not in self.student_loops:
            raise KeyError(f"{self.name}: no engine for the UNet graph {unet_graph!r}")
        return self.student_loops[unet_graph]

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            parts: list[Any] = [self.step_loop, *self.student_loops.values(), *self.engines.values()]
            for part in parts:  # the step loop first: it may hold captures on the engines' buffers
                close = getattr(part, "close", None)
                if callable(close):
                    close()
