"""Samplers: DDPM (respaced) and DDIM for epsilon-models; Euler, Heun, adaptive dopri5 and the Euler–Maruyama SDE
sampler for flow models; a timestep shift for the flow samplers; CFG.

Flow time runs from t = 1 (noise) to t = 0 (data) on the path x_t = (1 - t) x0 + t eps with velocity eps - x0
(``dcae15.diffusion.objectives.FlowObjective``); REPA's samplers use the same direction, SiT's and LightningDiT's
``transport`` the opposite one (their t is our 1 - t).
"""

from __future__ import annotations

from typing import Callable

import torch

from dcae15.diffusion.objectives import DDPMObjective, Objective

__all__ = ["SAMPLERS", "SDE_LAST_STEP", "flow_time_grid", "guided_model", "respaced_timesteps", "sample_latents",
           "shift_time"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun", "dopri5", "sde")}
SDE_LAST_STEP = 0.04  # SiT ``sample_sde(last_step="Mean", last_step_size=0.04)``, REPA ``linspace(1, 0.04, n)``


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The timestep shift t' = shift·t / (1 + (shift - 1)·t) of a noise level t in [0, 1] (1 = noise).

    ``shift`` > 1 spends more of a fixed step budget near the noise end, < 1 near the data end; 1 is the identity.
    It is LightningDiT's ``timestep_shift`` written in our time direction: their (SiT) time u = 1 - t is shifted as
    u' = u / (u + shift (1 - u)), and 1 - u' is the formula above (SD3's shifted schedule has the same form).
    """
    return shift * t / (1 + (shift - 1) * t)


def flow_time_grid(steps: int, sampler: str, shift: float = 1.0) -> list[float]:
    """The times a fixed-step flow sampler visits, from 1 to 0: ``steps`` + 1 points.

    Euler / Heun: ``steps`` equal steps over [1, 0]. SDE: ``steps`` - 1 Euler–Maruyama steps over [1, 0.04] then
    one last step to 0 (REPA ``euler_maruyama_sampler``: ``linspace(1, 0.04, steps)`` + [0]; SiT's
    ``last_step_size=0.04``), so ``steps`` model evaluations in both. Every point is then shifted
    (:func:`shift_time`); the end points 1 and 0 stay where they are.
    """
    if sampler == "sde":
        if steps < 2:
            raise ValueError(f"the SDE sampler needs steps >= 2 (one stochastic step and the last one), got {steps}")
        grid = torch.cat([torch.linspace(1.0, SDE_LAST_STEP, steps, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64)])
    else:
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(grid, float(shift)).tolist() if shift != 1.0 else grid.tolist()


def guided_model(model: ModelFn, *, cfg_scale: float, null_class: int,
                 interval: tuple[float, float] = (0.0, 1.0)) -> ModelFn:
    """Classifier-free guidance: uncond + s (cond - uncond), only while t/1000 lies in ``interval`` (1 = noise).

    Conditional and null-label passes run as one batch. Outside the interval the plain conditional output is used.
    """
    lo, hi = interval
    if cfg_scale == 1.0:
        return model
    everywhere = lo <= 0.0 and hi >= 1.0  # the default: no need to read t (a host sync on a GPU)

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not everywhere and not lo <= float(t.reshape(-1)[0]) / 1000.0 <= hi:  # all samples share t
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return fn


def respaced_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` evenly spaced indices over [0, num_timesteps - 1] (ADM/DiT ``space_timesteps`` with one section)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}]")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    stride = (num_timesteps - 1) / (steps - 1)
    return torch.tensor(sorted({round(i * stride) for i in range(steps)}), dtype=torch.long)


def _ddpm_loop(model: ModelFn, obj: DDPMObjective, x: torch.Tensor, y: torch.Tensor, steps: int,
               gen: torch.Generator, eta: float | None) -> torch.Tensor:
    """Ancestral DDPM (eta=None: posterior variance of the respaced chain) or DDIM (eta >= 0)."""
    ts = respaced_timesteps(obj.num_timesteps, steps)
    ab = obj.alphas_cumprod[ts]  # float64, respaced chain
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    for i in reversed(range(len(ts))):
        a, ap = float(ab[i]), float(ab_prev[i])
        t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
        eps = model(x, t, y).float()
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device) if i > 0 else None
        if eta is None:  # DDPM posterior q(x_prev | x_t, x0) of the respaced chain
            beta = 1 - a / ap
            mean = (ap ** 0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - ap) / (1 - a)) * x
            var = beta * (1 - ap) / (1 - a)
            x = mean + (var ** 0.5) * noise if noise is not None else mean
        else:  # DDIM
            sigma = eta * ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
            x = ap ** 0.5 * x0 + max(1 - ap - sigma ** 2, 0.0) ** 0.5 * eps
            if noise is not None and sigma > 0:
                x = x + sigma * noise
    return x


def _flow_loop(model: ModelFn, x: torch.Tensor, y: torch.Tensor, steps: int, method: str, atol: float, rtol: float,
               shift: float, gen: torch.Generator) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=1 (noise) to t=0 (data), or its reverse-time SDE (``method='sde'``)."""

    def v(t: float, xx: torch.Tensor) -> torch.Tensor:
        return model(xx, torch.full((xx.shape[0],), t * 1000.0, device=xx.device), y).float()

    if method == "dopri5":
        from torchdiffeq import odeint

        if shift == 1.0:
            fn = lambda u, xx: v(float(u), xx)  # noqa: E731
        else:  # t = shift_time(u): dx/du = v(x, t(u)) dt/du; only where the adaptive solver steps changes
            fn = lambda u, xx: v(shift_time(float(u), shift), xx) * (shift / (1 + (shift - 1) * float(u)) ** 2)  # noqa: E731
        return odeint(fn, x, torch.tensor([1.0, 0.0], dtype=torch.float64), method="dopri5", atol=atol,
                      rtol=rtol)[-1]
    grid = flow_time_grid(steps, method, shift)
    if method == "sde":
        return _sde_loop(v, x, grid, gen)
    for t, t_next in zip(grid[:-1], grid[1:]):
        d = v(t, x)
        if method == "heun" and t_next > 0:  # EDM: the last step to t=0 is plain Euler
            x_pred = x + (t_next - t) * d
            x = x + (t_next - t) * 0.5 * (d + v(t_next, x_pred))
        else:
            x = x + (t_next - t) * d
    return x


def _sde_loop(v: Callable[[float, torch.Tensor], torch.Tensor], x: torch.Tensor, grid: list[float],
              gen: torch.Generator) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time SDE of the linear path, as REPA / REPA-E (``samplers.py``
    ``euler_maruyama_sampler``) and SiT (``transport`` ``sample_sde``: ``diffusion_form="sigma"``,
    ``last_step="Mean"``) run it.

    The diffusion coefficient is w(t) = 2t; the score of the path from the velocity is s = -((1 - t) v + x) / t
    (``get_score_from_velocity``: alpha = 1 - t, sigma = t), so the drift v - w s / 2 is (2 - t) v + x. Each step is
    x <- x + drift dt + sqrt(w |dt|) xi; the last step (from 0.04 to 0) is the drift's mean step without noise.
    Guidance acts on v; the drift is affine in v with the same x, so this equals REPA's guidance of the drift.
    """
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t
        drift = (2.0 - t) * v(t, x) + x
        x = x + drift * dt
        if i < len(grid) - 2:  # every step but the last adds noise
            noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
            x = x + (2.0 * t * abs(dt)) ** 0.5 * noise
    return x


@torch.no_grad()
def sample_latents(model: ModelFn, objective: Objective, *, shape: tuple[int, ...], labels: torch.Tensor,
                   sampler: str, steps: int, generator: torch.Generator, cfg_scale: float = 1.0,
                   guidance_interval: tuple[float, float] = (0.0, 1.0), null_class: int = 1000, eta: float = 0.0,
                   atol: float = 1e-5, rtol: float = 1e-5, shift: float = 1.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw latents (B, C, H, W) for ``labels`` from noise drawn with ``generator`` (deterministic under a seed).

    Args:
        model: ``model(x, t, y)`` (EMA weights, eval mode).
        objective: what the model predicts; picks the allowed samplers (see ``SAMPLERS``).
        sampler: 'ddpm' / 'ddim' for epsilon-models, 'euler' / 'heun' / 'dopri5' / 'sde' (Euler–Maruyama, REPA-E's
            and SiT's SDE sampler) for flow models.
        steps: respaced DDPM/DDIM steps, fixed ODE steps, or the SDE's model evaluations (ignored by dopri5).
        shift: flow models' timestep shift (``shift_time``; LightningDiT's ``timestep_shift``); 1 = none.
        cfg_scale / guidance_interval: classifier-free guidance and the normalised-time window it acts in.
    """
    allowed = SAMPLERS[objective.kind]
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not fit a {objective.kind} model; allowed: {allowed}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0 (1 = no timestep shift)")
    if shift != 1.0 and objective.kind != "flow":
        raise ValueError(f"a timestep shift applies to flow models' samplers, not to {sampler!r}")
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    y = labels.to(device)
    fn = guided_model(model, cfg_scale=cfg_scale, null_class=null_class, interval=guidance_interval)
    if objective.kind == "ddpm":
        return _ddpm_loop(fn, objective, x, y, steps, generator, None if sampler == "ddpm" else eta)
    return _flow_loop(fn, x, y, steps, sampler, atol, rtol, shift, generator)
