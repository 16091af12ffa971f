"""Training objectives: DDPM epsilon-prediction (linear / scaled-linear betas) and linear-path flow matching."""

from __future__ import annotations

import torch

__all__ = ["Objective", "DDPMObjective", "FlowObjective", "make_objective", "betas_for"]

NUM_TIMESTEPS = 1000


def betas_for(schedule: str, n: int = NUM_TIMESTEPS) -> torch.Tensor:
    """DDPM beta schedule in float64: 'linear' (DiT/ADM, 1e-4..0.02) or 'scaled-linear' (UViT/SD, sqrt-space)."""
    if schedule == "linear":
        scale = 1000 / n
        return torch.linspace(scale * 1e-4, scale * 0.02, n, dtype=torch.float64)
    if schedule == "scaled-linear":
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    raise ValueError(f"beta schedule {schedule!r}; allowed: ('linear', 'scaled-linear')")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class Objective:
    """What the network learns: ``prepare(x0, noise, u)`` -> (x_t, model time in [0, 1000], target).

    ``u`` ~ U[0, 1) per sample (drawn by the caller from its seeded generator) is mapped to the objective's time,
    so both objectives consume the same random numbers and stay reproducible.
    """

    kind: str
    name: str

    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor):
        raise NotImplementedError


class DDPMObjective(Objective):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps, t uniform over 1000 discrete steps."""

    kind = "ddpm"

    def __init__(self, schedule: str = "linear"):
        self.name = f"ddpm-{schedule}"
        self.schedule = schedule
        self.betas = betas_for(schedule)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64 [1000]
        self.num_timesteps = len(self.betas)
        self._on_device: dict = {}  # alphas_cumprod per device: no host->device copy per training step

    def prepare(self, x0, noise, u):
        t = (u * self.num_timesteps).long().clamp_(max=self.num_timesteps - 1)  # (B,) ints
        if x0.device not in self._on_device:
            self._on_device[x0.device] = self.alphas_cumprod.to(x0.device)
        ab = self._on_device[x0.device][t]
        x_t = _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * noise
        return x_t, t.to(x0.dtype), noise


class FlowObjective(Objective):
    """Linear path x_t = (1 - t) x0 + t eps (t=0 data, t=1 noise), target velocity eps - x0 (SiT)."""

    kind = "flow"
    name = "flow"

    def prepare(self, x0, noise, u):
        t = u.to(x0.dtype)
        x_t = _bcast(1 - t, x0) * x0 + _bcast(t, x0) * noise
        return x_t, t * 1000.0, noise - x0  # the model sees time on the same 0..1000 scale as DDPM


def make_objective(name: str) -> Objective:
    """'ddpm-linear', 'ddpm-scaled-linear' or 'flow'."""
    if name == "flow":
        return FlowObjective()
    if name in ("ddpm-linear", "ddpm-scaled-linear"):
        return DDPMObjective(name.removeprefix("ddpm-"))
    raise ValueError(f"objective {name!r}; allowed: ('ddpm-linear', 'ddpm-scaled-linear', 'flow')")
