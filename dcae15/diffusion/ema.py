"""EMA of a (possibly FSDP2-sharded) model: fp32 shadow weights in the parameters' own sharding, one fused update."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ShardedEMA"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedEMA:
    """``ema <- ema + (1 - decay) (param - ema)`` for all parameters with one ``torch._foreach_lerp_`` call.

    The shadow weights are fp32 clones of the parameters (DTensors stay DTensors with the same placements, so no
    rank ever holds a full copy). The update works on the rank-local shards, collected once: a Python loop over
    hundreds of DTensors costs ~10 ms per step (DiT-XL), the fused update about 1 ms.

    ``shadow`` (name -> tensor) is what a checkpoint saves and loads in place. Call ``refresh()`` after
    anything replaces the model's parameter objects (loading a checkpoint into FSDP2 may).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        with torch.no_grad():
            self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}
        self.refresh()

    def refresh(self) -> None:
        params = dict(self.model.named_parameters())
        self._ema = [_local(self.shadow[n]) for n in params]
        self._params = [_local(p.detach()) for p in params.values()]
        if any(p.dtype != torch.float32 for p in self._params):  # sharded params are fp32 under FSDP2's policy
            raise ValueError("ShardedEMA needs fp32 parameters (FSDP2 keeps fp32 shards; cast the model first)")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self._ema, self._params, 1.0 - decay)
