"""Peers' flow samplers on a case with an exact answer (issue 31 item 4): the Euler–Maruyama SDE sampler with SiT's /
REPA's last-step rule, and the timestep shift, driven by the exact velocity of Gaussian data N(mu, s²).

For Gaussian data every fixed-step sampler is an affine map per step (x <- p x + q, plus independent noise for the
SDE), so the exact mean and variance of what it outputs follow from the time grid alone; they are propagated here in
closed form, and the samples' mean and variance must match them within a few standard errors of the sample count.
The exact chain in turn lands within its discretisation error of N(mu, s²).
"""

from __future__ import annotations

import math

import pytest
import torch

from dcae15.diffusion.objectives import make_objective
from dcae15.diffusion.samplers import SDE_LAST_STEP, flow_time_grid, sample_latents, shift_time

MU, S = 1.5, 0.5
N = 20_000  # samples, one scalar each


def _coeffs(t: float) -> tuple[float, float]:
    """v(x, t) = a x + b: the exact velocity E[eps - x0 | x_t] of x0 ~ N(MU, S²) on x_t = (1 - t) x0 + t eps."""
    m, var = (1 - t) * MU, (1 - t) ** 2 * S ** 2 + t ** 2
    a = (t - (1 - t) * S ** 2) / var
    return a, -a * m - MU


class ExactVelocity:
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, x, t, y):
        tt = float(t[0]) / 1000.0
        self.times.append(tt)
        a, b = _coeffs(tt)
        return (a * x.double() + b).to(x.dtype)


def _chain_moments(sampler: str, grid: list[float]) -> tuple[float, float]:
    """Exact (mean, variance) of the sampler's output from x_1 ~ N(0, 1) on this time grid."""
    mean, var = 0.0, 1.0
    for i, (t, tn) in enumerate(zip(grid[:-1], grid[1:])):
        dt = tn - t
        a, b = _coeffs(t)
        if sampler == "euler" or (sampler == "heun" and tn == 0):
            p, q, noise = 1 + dt * a, dt * b, 0.0
        elif sampler == "heun":
            a2, b2 = _coeffs(tn)
            p = 1 + dt / 2 * (a + a2 * (1 + dt * a))
            q = dt / 2 * (b + a2 * dt * b + b2)
            noise = 0.0
        else:  # sde: drift (2 - t) v + x, noise 2 t |dt| except on the last step
            p, q = 1 + dt * ((2 - t) * a + 1), dt * (2 - t) * b
            noise = 2 * t * abs(dt) if i < len(grid) - 2 else 0.0
        mean, var = p * mean + q, p * p * var + noise
    return mean, var


def _draw(sampler, steps, shift=1.0, seed=0):
    model = ExactVelocity()
    z = sample_latents(model, make_objective("flow"), shape=(N, 1, 1, 1), labels=torch.zeros(N, dtype=torch.long),
                       sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed), shift=shift,
                       null_class=1)
    return z.double().flatten(), model


def _assert_moments(z, mean, var):
    n = len(z)
    # 5 standard errors of the sample mean and of the sample variance (Gaussian output: Var(s²) = 2 var² / (n - 1))
    assert abs(float(z.mean()) - mean) <= 5 * math.sqrt(var / n), (float(z.mean()), mean)
    assert abs(float(z.var()) - var) <= 5 * var * math.sqrt(2 / (n - 1)), (float(z.var()), var)


@pytest.mark.parametrize("steps", [250, 50])
def test_sde_sampler_matches_its_exact_chain_and_the_data(steps):
    z, model = _draw("sde", steps)
    grid = flow_time_grid(steps, "sde")
    assert grid[0] == 1.0 and grid[-2] == pytest.approx(SDE_LAST_STEP) and grid[-1] == 0.0
    assert len(model.times) == steps and min(model.times) == pytest.approx(SDE_LAST_STEP)  # no call at t = 0
    mean, var = _chain_moments("sde", grid)
    _assert_moments(z, mean, var)
    # the chain itself: Euler–Maruyama's O(dt) error plus the noiseless last step from 0.04 (a few % of S²)
    assert abs(mean - MU) < 0.02 and abs(var - S ** 2) < 0.05 * S ** 2 + 2.0 / steps * S ** 2, (mean, var)


def test_sde_sampler_is_stochastic_beyond_its_initial_noise():
    """Two seeds differ; one seed repeats; the ODE from the same initial noise is a different map."""
    a, _ = _draw("sde", 20, seed=1)
    b, _ = _draw("sde", 20, seed=1)
    c, _ = _draw("sde", 20, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    e, _ = _draw("euler", 20, seed=1)
    assert not torch.allclose(a, e, atol=1e-3)


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 40, 3.0), ("euler", 40, 0.3), ("heun", 12, 3.0),
                                                 ("sde", 100, 2.0)])
def test_timestep_shift_moves_the_grid_and_keeps_the_answer(sampler, steps, shift):
    z, model = _draw(sampler, steps, shift)
    grid = flow_time_grid(steps, sampler, shift)
    base = flow_time_grid(steps, sampler)
    assert grid == pytest.approx([shift * u / (1 + (shift - 1) * u) for u in base], abs=1e-12)
    assert grid[0] == pytest.approx(1.0) and grid[-1] == 0.0
    # the model is evaluated at the shifted times (Heun: the step's end points as well)
    assert model.times[0] == pytest.approx(1.0) and model.times[1] == pytest.approx(grid[1], abs=1e-6)
    if shift > 1:  # more of the budget near the noise end
        assert grid[1] > base[1]
    mean, var = _chain_moments(sampler, grid)
    _assert_moments(z, mean, var)
    # the shifted chain converges to the data as its steps grow (a shift > 1 leaves fewer steps near the data end,
    # where the variance forms: at 40 steps its error is a few times the unshifted one)
    fine = _chain_moments(sampler, flow_time_grid(8 * steps, sampler, shift))
    if sampler == "sde":  # its noiseless last step from shift_time(0.04) stays: a bias of a few % that steps keep
        assert abs(fine[0] - MU) < 0.01 and abs(fine[1] - S ** 2) < 0.1 * S ** 2, (var, fine)
    else:
        assert abs(fine[0] - MU) < 0.01 and abs(fine[1] - S ** 2) < 0.5 * abs(var - S ** 2) + 1e-3, (var, fine)


def test_dopri5_with_a_shift_integrates_the_same_ode():
    z1, _ = _draw("dopri5", 1)
    z2, _ = _draw("dopri5", 1, shift=3.0)
    # a change of time variable: the same flow map up to the solver's error. dopri5 keeps each step's error estimate
    # under atol + rtol |x| = 1e-5 (1 + |x|) (sample_latents' defaults) in the RMS over the 20 000 samples, ~1e-4 at
    # the largest |x| = 4.3; 6 and 11 accepted steps. Seen: 1.9e-4 and 5e-5 from the exact map MU + S x1, 1.5e-4
    # apart, under ATEN_CPU_CAPABILITY=default and avx512 alike; 1e-3 is 6x that.
    assert torch.allclose(z1, z2, atol=1e-3)
    _assert_moments(z2, MU, S ** 2)


def test_shift_and_sde_argument_checks():
    assert shift_time(0.5, 1.0) == 0.5 and shift_time(1.0, 3.0) == 1.0 and shift_time(0.0, 3.0) == 0.0
    obj = make_objective("flow")
    kw = dict(shape=(2, 1, 1, 1), labels=torch.zeros(2, dtype=torch.long), generator=torch.Generator(),
              null_class=1)
    with pytest.raises(ValueError, match="shift=0.0 must be > 0"):
        sample_latents(ExactVelocity(), obj, sampler="euler", steps=4, shift=0.0, **kw)
    with pytest.raises(ValueError, match="steps >= 2"):
        sample_latents(ExactVelocity(), obj, sampler="sde", steps=1, **kw)
    with pytest.raises(ValueError, match="flow models"):
        sample_latents(ExactVelocity(), make_objective("ddpm-linear"), sampler="ddim", steps=4, shift=2.0, **kw)
