"""Samplers: DDPM (respaced) and DDIM for epsilon-models; Euler, Heun and adaptive dopri5 for flow models; CFG."""

from __future__ import annotations

from typing import Callable

import torch

from dcae15.diffusion.objectives import DDPMObjective, Objective

__all__ = ["SAMPLERS", "guided_model", "respaced_timesteps", "sample_latents"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun", "dopri5")}


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


def _flow_loop(model: ModelFn, x: torch.Tensor, y: torch.Tensor, steps: int, method: str,
               atol: float, rtol: float) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=1 (noise) to t=0 (data)."""

    def v(t: float, xx: torch.Tensor) -> torch.Tensor:
        return model(xx, torch.full((xx.shape[0],), t * 1000.0, device=xx.device), y).float()

    if method == "dopri5":
        from torchdiffeq import odeint

        ts = torch.tensor([1.0, 0.0], dtype=torch.float64)
        return odeint(lambda t, xx: v(float(t), xx), x, ts, method="dopri5", atol=atol, rtol=rtol)[-1]
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(grid[:-1], grid[1:]):
        d = v(t, x)
        if method == "heun" and t_next > 0:  # EDM: the last step to t=0 is plain Euler
            x_pred = x + (t_next - t) * d
            x = x + (t_next - t) * 0.5 * (d + v(t_next, x_pred))
        else:
            x = x + (t_next - t) * d
    return x


@torch.no_grad()
def sample_latents(model: ModelFn, objective: Objective, *, shape: tuple[int, ...], labels: torch.Tensor,
                   sampler: str, steps: int, generator: torch.Generator, cfg_scale: float = 1.0,
                   guidance_interval: tuple[float, float] = (0.0, 1.0), null_class: int = 1000, eta: float = 0.0,
                   atol: float = 1e-5, rtol: float = 1e-5, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw latents (B, C, H, W) for ``labels`` from noise drawn with ``generator`` (deterministic under a seed).

    Args:
        model: ``model(x, t, y)`` (EMA weights, eval mode).
        objective: what the model predicts; picks the allowed samplers (see ``SAMPLERS``).
        sampler: 'ddpm' / 'ddim' for epsilon-models, 'euler' / 'heun' / 'dopri5' for flow models.
        steps: respaced DDPM/DDIM steps or fixed ODE steps (ignored by dopri5).
        cfg_scale / guidance_interval: classifier-free guidance and the normalised-time window it acts in.
    """
    allowed = SAMPLERS[objective.kind]
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not fit a {objective.kind} model; allowed: {allowed}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    y = labels.to(device)
    fn = guided_model(model, cfg_scale=cfg_scale, null_class=null_class, interval=guidance_interval)
    if objective.kind == "ddpm":
        return _ddpm_loop(fn, objective, x, y, steps, generator, None if sampler == "ddpm" else eta)
    return _flow_loop(fn, x, y, steps, sampler, atol, rtol)
