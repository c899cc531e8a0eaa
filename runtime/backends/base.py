"""The one small interface every inference backend implements: an engine per graph, ``run`` on named arrays."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    """One loaded graph. ``run`` takes host arrays by input name and returns host arrays by output name.

    Implementations keep their buffers between calls of the same shapes; the returned arrays may be those
    buffers, so a caller copies what it must keep past the next call.
    """

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class StepLoop(Protocol):
    """A whole denoising loop on one device, when a backend can do better than one ``run`` per step
    (device-resident latents, captured CUDA graphs)."""

    def __call__(self, latents: np.ndarray, cond_features: np.ndarray, timesteps: np.ndarray,
                 coef_x0: np.ndarray, coef_xt: np.ndarray, sqrt_alpha: np.ndarray) -> np.ndarray: ...
