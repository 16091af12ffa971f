"""The learning-rate schedule both trainers use: linear warm-up, then constant or cosine to 0."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_at"]

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base: float, *, warmup_steps: int = 0, schedule: str = "constant",
          total_steps: int | None = None) -> float:
    """Learning rate of the update that produces ``step + 1``.

    Linear warm-up ``base * (step + 1) / warmup_steps`` over the first ``warmup_steps`` updates, then ``base``
    ("constant", the DiT / U-ViT recipes) or a half cosine from ``base`` to 0 at ``total_steps`` ("cosine").
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; allowed: {SCHEDULES}")
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs total_steps (where the learning rate reaches 0)")
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return base
