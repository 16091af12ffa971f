"""The EMA both trainers keep: fp32 shadow weights in the parameters' own sharding, one fused update per step.

The AE trainer (``dcae15.ae.train``, DDP or one process, optional BatchNorm buffers) and the diffusion trainer
(``dcae15.diffusion.train``, FSDP2 DTensors) use this one class; ``decay_at`` is the (optional) warm-up of the decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["EMA", "decay_at"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def decay_at(decay: float, step: int, *, warmup: bool = False, warmup_steps: int | None = None) -> float:
    """The decay of the update that produces ``step + 1``: ``decay``; with ``warmup``
    ``min(decay, (1 + step) / (10 + step))`` so that the early EMA tracks the model (DiT / ADM); with
    ``warmup_steps`` T ``decay * (1 - exp(-(step + 1) / T))`` (efficientvit's ``EMA.step``, which DC-Gen's USiT
    training inherits, T = 2000), which takes precedence."""
    if warmup_steps:
        return decay * (1.0 - math.exp(-(step + 1) / warmup_steps))
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA:
    """``ema <- ema + (1 - decay) (x - ema)`` for all parameters with one ``torch._foreach_lerp_`` call.

    The shadow weights are fp32 clones of the parameters (DTensors stay DTensors with the same placements, so no
    rank ever holds a full copy). The update works on the rank-local shards, collected once: a Python loop over
    hundreds of DTensors costs ~10 ms per step (DiT-XL), the fused update about 1 ms.

    With ``buffers=True`` the shadow covers the whole ``state_dict`` (parameters and persistent buffers, e.g.
    BatchNorm running statistics): floating buffers are averaged like parameters, integer ones (batch counters)
    copied. ``shadow`` (name -> fp32 tensor) is what a checkpoint saves and loads (in place, or through
    ``load_state_dict``). Call ``refresh()`` after anything replaces the model's parameter or buffer objects
    (loading a checkpoint into FSDP2 may, so may ``model.to(...)``).
    """

    def __init__(self, model: nn.Module, *, buffers: bool = False):
        self.model, self.buffers = model, buffers
        with torch.no_grad():
            self.shadow = {n: t.detach().clone().float() for n, t in self._tracked().items()}
        self.refresh()

    def _tracked(self) -> dict[str, torch.Tensor]:
        if self.buffers:
            return dict(self.model.state_dict(keep_vars=True))  # parameters + persistent buffers
        return dict(self.model.named_parameters())

    def refresh(self) -> None:
        live = self._tracked()
        if set(live) != set(self.shadow):
            raise ValueError(f"EMA: the model's tensors changed names: {sorted(set(live) ^ set(self.shadow))[:5]}")
        floats = [n for n, t in live.items() if t.is_floating_point()]
        others = [n for n, t in live.items() if not t.is_floating_point()]
        self._ema = [_local(self.shadow[n]) for n in floats]
        self._src = [_local(live[n].detach()) for n in floats]
        self._copies = [(_local(self.shadow[n]), _local(live[n].detach())) for n in others]
        if any(p.dtype != torch.float32 for p in self._src):  # sharded params are fp32 under FSDP2's policy
            raise ValueError("EMA needs fp32 parameters (FSDP2 keeps fp32 shards; cast the model first)")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self._ema, self._src, 1.0 - decay)
        for dst, src in self._copies:
            dst.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a saved shadow (``state_dict()``) into this one, in place."""
        if set(sd) != set(self.shadow):
            raise ValueError(f"EMA state does not match the model: differing keys "
                             f"{sorted(set(sd) ^ set(self.shadow))[:5]}")
        for n, t in sd.items():
            self.shadow[n].copy_(t)
