"""Every sampler, driven by the exact (Bayes-optimal) denoiser of a known distribution, must reproduce it.

For a Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) the noised marginal is again a mixture, so the optimal epsilon
(DDPM) and velocity (linear-path flow) are closed-form. No training is involved: a failure here is a sampler bug.
"""

from __future__ import annotations

import pytest
import torch

from dcae15.diffusion.objectives import make_objective
from dcae15.diffusion.samplers import sample_latents

D = 2  # data dimension: latents of shape (D, 1, 1)
NULL = 9  # the null class of classifier-free guidance


class ExactDenoiser:
    """``model(x, t, y)`` for per-label Gaussian mixtures {label: (weights [K], means [K, D], stds [K])}."""

    def __init__(self, objective, mixtures: dict[int, tuple[list, list, list]]):
        self.obj = objective
        self.mix = {y: tuple(torch.tensor(v, dtype=torch.float64) for v in m) for y, m in mixtures.items()}
        self.calls: list[tuple[float, bool]] = []  # (t / 1000, whether the null label was asked for)

    def _one(self, x: torch.Tensor, t: float, y: int) -> torch.Tensor:
        w, mu, s = self.mix[y]
        if self.obj.kind == "ddpm":
            a = float(self.obj.alphas_cumprod[int(round(t))])
            mean_scale, noise_scale = a ** 0.5, (1 - a) ** 0.5
        else:
            tt = t / 1000.0
            mean_scale, noise_scale = 1 - tt, tt
        var = mean_scale ** 2 * s ** 2 + noise_scale ** 2  # (K,)
        diff = x[:, None, :] - mean_scale * mu[None]  # (B, K, D)
        logp = torch.log(w)[None] - 0.5 * (diff ** 2).sum(-1) / var[None] - 0.5 * D * torch.log(var)[None]
        r = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1) responsibilities
        e_eps = (r * noise_scale * diff / var[None, :, None]).sum(1)  # E[eps | x_t]
        if self.obj.kind == "ddpm":
            return e_eps
        e_x0 = (r * (mu[None] + mean_scale * (s ** 2)[None, :, None] * diff / var[None, :, None])).sum(1)
        return e_eps - e_x0  # velocity target eps - x0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), D).double()
        self.calls.append((float(t[0]) / 1000.0, bool((y == NULL).any())))
        out = torch.empty_like(flat)
        for label in y.unique().tolist():
            sel = y == label
            out[sel] = self._one(flat[sel], float(t[0]), int(label))
        return out.reshape(x.shape).to(x.dtype)


def _sample(objective, model, sampler, steps, n, label, cfg_scale=1.0, interval=(0.0, 1.0), seed=0):
    y = torch.full((n,), label, dtype=torch.long)
    z = sample_latents(model, objective, shape=(n, D, 1, 1), labels=y, sampler=sampler, steps=steps,
                       generator=torch.Generator().manual_seed(seed), cfg_scale=cfg_scale,
                       guidance_interval=interval, null_class=NULL)
    return z.reshape(n, D).double()


def _expected_mean(obj, sampler, mu, s):
    """The Gaussian's mean as a sampler started from N(0, I) must reproduce it. The scaled-linear schedule ends at
    abar_T = 0.0047, not at zero SNR: the true x_T is N(sqrt(abar_T) mu, abar_T s^2 + 1 - abar_T). The deterministic
    DDIM map is affine, x0 = mu + (x_T - sqrt(abar_T) mu) s / sd_T, so starting from mean 0 lands at
    mu (1 - sqrt(abar_T) s / sd_T): a property of the schedule, which ancestral DDPM's fresh noise washes out."""
    mu = torch.tensor(mu, dtype=torch.float64)
    if obj.kind != "ddpm" or sampler != "ddim":
        return mu
    a = float(obj.alphas_cumprod[-1])
    return mu * (1 - a ** 0.5 * s / (a * s ** 2 + 1 - a) ** 0.5)


# (objective, sampler, steps): every sampler, both DDPM beta schedules
SAMPLERS = [("ddpm-linear", "ddpm", 100), ("ddpm-linear", "ddim", 50), ("ddpm-scaled-linear", "ddpm", 100),
            ("ddpm-scaled-linear", "ddim", 50), ("flow", "euler", 100), ("flow", "heun", 30), ("flow", "dopri5", 1),
            ("flow", "sde", 100)]


@pytest.mark.parametrize("name,sampler,steps", SAMPLERS)
def test_samplers_reproduce_a_gaussian(name, sampler, steps):
    obj = make_objective(name)
    mu, s = [1.5, -0.5], 0.6
    model = ExactDenoiser(obj, {0: ([1.0], [mu], [s])})
    z = _sample(obj, model, sampler, steps, 4000, 0)
    # sampling error at n = 4000 (seeded, float64): the mean's SE is 0.6 / sqrt(4000) = 0.0095 (atol ~4 SE), the
    # std's ~0.6 / sqrt(8000) = 0.0067 (atol ~7 SE: room for the sampler's discretisation error)
    assert torch.allclose(z.mean(0), _expected_mean(obj, sampler, mu, s), atol=0.04), z.mean(0)
    assert torch.allclose(z.std(0), torch.full((D,), s, dtype=torch.float64), atol=0.05), z.std(0)


@pytest.mark.parametrize("name,sampler,steps", SAMPLERS)
def test_samplers_reproduce_mixture_weights(name, sampler, steps):
    obj = make_objective(name)
    w, mus, s = [0.25, 0.75], [[-2.0, 0.0], [2.0, 1.0]], [0.4, 0.4]
    model = ExactDenoiser(obj, {0: (w, mus, s)})
    z = _sample(obj, model, sampler, steps, 4000, 0)
    nearest = torch.cdist(z, torch.tensor(mus, dtype=torch.float64)).argmin(1)
    frac = float((nearest == 0).double().mean())
    # SEs at n = 4000: the weight's sqrt(0.25 * 0.75 / 4000) = 0.0068 (0.03 ~4.4 SE); per component (n >= ~1000)
    # the mean's 0.4 / sqrt(1000) = 0.013 (0.06 ~4.7 SE) and the std's ~0.009 (0.06 ~6.7 SE)
    assert abs(frac - w[0]) < 0.03, frac
    for k in range(2):
        part = z[nearest == k]
        assert torch.allclose(part.mean(0), torch.tensor(mus[k], dtype=torch.float64), atol=0.06), (k, part.mean(0))
        assert torch.allclose(part.std(0), torch.full((D,), s[k], dtype=torch.float64), atol=0.06), (k, part.std(0))


@pytest.mark.parametrize("name,sampler,steps", SAMPLERS)
def test_cfg_with_exact_scores_shifts_the_mean(name, sampler, steps):
    """Unit-variance Gaussians: cond N(mu_c, I), uncond N(mu_u, I). The guided score is exactly the score of
    N(mu_u + w (mu_c - mu_u), I) at every noise level, so guided sampling must land there, with unit std."""
    obj = make_objective(name)
    mu_c, mu_u, scale = [1.0, 0.5], [0.0, -0.5], 2.5
    model = ExactDenoiser(obj, {3: ([1.0], [mu_c], [1.0]), NULL: ([1.0], [mu_u], [1.0])})
    z = _sample(obj, model, sampler, steps, 4000, 3, cfg_scale=scale)
    want = _expected_mean(obj, sampler, [u + scale * (c - u) for c, u in zip(mu_c, mu_u)], 1.0)
    # SEs at n = 4000, unit std: the mean's 0.016 (0.08 ~5 SE), the std's ~0.011 (0.06 ~5.4 SE)
    assert torch.allclose(z.mean(0), want, atol=0.08), (z.mean(0), want)
    assert torch.allclose(z.std(0), torch.ones(D, dtype=torch.float64), atol=0.06), z.std(0)


@pytest.mark.parametrize("name,sampler,steps", [("ddpm-linear", "ddim", 50), ("flow", "euler", 40)])
def test_guidance_interval_switches_where_it_says(name, sampler, steps):
    obj = make_objective(name)
    model = ExactDenoiser(obj, {3: ([1.0], [[1.0, 0.5]], [1.0]), NULL: ([1.0], [[0.0, 0.0]], [1.0])})
    lo, hi = 0.3, 0.7
    _sample(obj, model, sampler, steps, 16, 3, cfg_scale=2.0, interval=(lo, hi))
    assert model.calls, "the model was never called"
    for t, guided in model.calls:
        assert guided == (lo <= t <= hi), (t, guided)
    assert any(g for _, g in model.calls) and not all(g for _, g in model.calls)
