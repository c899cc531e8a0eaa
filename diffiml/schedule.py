"""The DDIM schedule as plain numpy: one definition for training, export and the runtime.

Follows diffusers' ``DDIMScheduler`` with the settings the authors use (linear betas, ``set_alpha_to_one=True``,
``timestep_spacing="leading"``, ``steps_offset=0``, ``clip_sample=True``, eta = 0, ``prediction_type="sample"``).
With sigma = 0 one step is, as in diffusers (which derives epsilon from the *unclipped* prediction):
``z_prev = coef_x0 * clip(z0_hat) + coef_xt * (z_t - sqrt_alpha * z0_hat)``
with ``coef_x0 = sqrt(a_prev)``, ``coef_xt = sqrt(1 - a_prev) / sqrt(1 - a_t)``, ``sqrt_alpha = sqrt(a_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffiml.constants import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """alpha-bar_t for t = 0..T-1 (float64), from linear betas."""
    betas = np.linspace(BETA_START, BETA_END, num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def respaced_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """'leading' spacing: 8 steps give [875, 750, ..., 125, 0]."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return (np.arange(steps, dtype=np.int64) * ratio)[::-1].copy()


@dataclass(frozen=True)
class DdimPlan:
    """Everything a sampler needs for K steps: timesteps and the three coefficients of each step."""

    timesteps: np.ndarray  # (K,) int64
    coef_x0: np.ndarray  # (K,) float32
    coef_xt: np.ndarray  # (K,) float32
    sqrt_alpha: np.ndarray  # (K,) float32

    def to_json(self) -> dict:
        return {
            "timesteps": [int(t) for t in self.timesteps],
            **{k: [float(c) for c in getattr(self, k)] for k in ("coef_x0", "coef_xt", "sqrt_alpha")},
        }

    @staticmethod
    def from_json(data: dict) -> DdimPlan:
        return DdimPlan(
            np.asarray(data["timesteps"], dtype=np.int64),
            *(np.asarray(data[k], dtype=np.float32) for k in ("coef_x0", "coef_xt", "sqrt_alpha")),
        )

    def steps(self) -> list[tuple[int, float, float, float]]:
        """(timestep, coef_x0, coef_xt, sqrt_alpha) per step."""
        return list(zip(self.timesteps.tolist(), self.coef_x0.tolist(), self.coef_xt.tolist(),
                        self.sqrt_alpha.tolist(), strict=True))


def ddim_plan(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DdimPlan:
    """The DDIM plan of ``steps`` respaced timesteps (diffusers' "leading" spacing, ``set_alpha_to_one``): each step
    lands on the next timestep, the last on the clean latent."""
    return plan_through(respaced_timesteps(steps, num_train_timesteps), num_train_timesteps)


def plan_through(timesteps: list[int] | np.ndarray, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DdimPlan:
    """A plan visiting exactly ``timesteps`` (descending), each step landing on the next one and the last on the
    clean latent (alpha-bar = 1). A distilled student's plan: every other timestep of its teacher's, so each of its
    steps spans two of the teacher's (8 steps [875, 750, ..., 0] -> 4 steps [875, 625, 375, 125])."""
    ts = np.asarray(timesteps, dtype=np.int64)
    if ts.ndim != 1 or not len(ts) or np.any(np.diff(ts) >= 0) or ts[-1] < 0 or ts[0] >= num_train_timesteps:
        raise ValueError(f"timesteps must descend within [0, {num_train_timesteps}), got {ts.tolist()}")
    acp = alphas_cumprod(num_train_timesteps)
    a_t, a_prev = acp[ts], np.append(acp[ts[1:]], 1.0)
    coef_xt = np.sqrt(1.0 - a_prev) / np.sqrt(1.0 - a_t)
    f32 = np.float32
    return DdimPlan(ts, np.sqrt(a_prev).astype(f32), coef_xt.astype(f32), np.sqrt(a_t).astype(f32))


def ensemble_noise(seed: int, members: int, shape: tuple[int, ...]) -> np.ndarray:
    """Initial latents for ``members`` draws, (members, *shape) float32.

    One definition shared by the PyTorch reference sampler and the runtime, so both start from the same noise
    for the same seed. The noise depends only on the seed, never on the batch an image happens to be in.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((members, *shape), dtype=np.float32)
