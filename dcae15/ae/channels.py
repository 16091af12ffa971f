"""Sampling c' for structured-latent training (Eq. 1): per batch or per sample, several per step, plus full c."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ChannelSampling", "step_generator"]

_MODES = ("per_batch", "per_sample")


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, salt), so a resumed run draws the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 97 + salt) % (2**63 - 1))


@dataclass(kw_only=True)
class ChannelSampling:
    """Which c' the decoder sees at a training step.

    Attributes:
        choices: the c' list, drawn uniformly (the paper: {16, 20, ..., c}).
        mode: "per_batch" (one c' shared by the batch, the official trainer) or "per_sample".
        per_step: how many c' draws (decoder passes) per step; their losses are averaged.
        include_full: add one more pass with all c channels every step.
    """

    choices: tuple[int, ...]
    mode: str = "per_batch"
    per_step: int = 1
    include_full: bool = False

    def __post_init__(self) -> None:
        self.choices = tuple(int(c) for c in self.choices)
        if not self.choices or any(c < 1 for c in self.choices):
            raise ValueError(f"ChannelSampling.choices must be a non-empty list of positive ints, got {self.choices}")
        if self.mode not in _MODES:
            raise ValueError(f"ChannelSampling.mode={self.mode!r}; allowed: {_MODES}")
        if self.per_step < 1:
            raise ValueError(f"ChannelSampling.per_step must be >= 1, got {self.per_step}")

    @property
    def full(self) -> int:
        return max(self.choices)

    def draw(self, generator: torch.Generator, batch_size: int) -> list[int | torch.Tensor]:
        """The c' of each decoder pass: ints (per batch) or LongTensors [B] (per sample); the full pass last."""
        table = torch.tensor(self.choices)
        out: list[int | torch.Tensor] = []
        for _ in range(self.per_step):
            if self.mode == "per_batch":
                out.append(int(table[torch.randint(len(table), (), generator=generator)]))
            else:
                out.append(table[torch.randint(len(table), (batch_size,), generator=generator)])
        if self.include_full:
            out.append(self.full)
        return out
