import numpy as np
import pytest

from diffiml.schedule import ddim_plan, ensemble_noise, respaced_timesteps


def test_eight_leading_steps_match_the_authors_timesteps():
    assert respaced_timesteps(8).tolist() == [875, 750, 625, 500, 375, 250, 125, 0]


def test_ddim_returns_z0_for_perfect_predictor():
    torch = pytest.importorskip("torch")
    from diffiml.train.ddim import ddim_update

    rng = np.random.default_rng(0)
    z0 = torch.from_numpy(rng.uniform(-0.9, 0.9, (3, 8, 4, 4)).astype(np.float32))
    z = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
    for _, cx0, cxt, sa in ddim_plan(8).steps():
        z = ddim_update(z, z0, cx0, cxt, sa)
    np.testing.assert_allclose(z.numpy(), z0.numpy(), atol=1e-6)


@pytest.mark.parametrize("steps", [1, 5, 8, 10])
def test_ddim_update_matches_diffusers(steps):
    """The one update that the exported step graph, the reference sampler and the benchmarks all call."""
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    from diffiml.train.ddim import ddim_update

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="sample",
                          timestep_spacing="leading")
    sched.set_timesteps(steps)
    plan = ddim_plan(steps)
    assert sched.timesteps.tolist() == plan.timesteps.tolist()
    rng = np.random.default_rng(1)
    for i, t in enumerate(sched.timesteps):
        z = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
        pred = (1.5 * rng.standard_normal(z.shape)).astype(np.float32)  # exercises the clip too
        coefs = (torch.tensor([c[i]]) for c in (plan.coef_x0, plan.coef_xt, plan.sqrt_alpha))  # as the graph gets them
        ours = ddim_update(torch.from_numpy(z), torch.from_numpy(pred), *coefs).numpy()
        ref = sched.step(torch.from_numpy(pred), t, torch.from_numpy(z), eta=0.0).prev_sample.numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4)  # float32 rounding of a refactored formula


def test_ensemble_noise_is_seeded():
    a, b = ensemble_noise(3, 5, (8, 2, 2)), ensemble_noise(3, 5, (8, 2, 2))
    assert a.dtype == np.float32 and a.shape == (5, 8, 2, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ensemble_noise(4, 5, (8, 2, 2)))
