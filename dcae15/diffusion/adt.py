"""Augmented diffusion training (DC-AE 1.5, Eq. 2): losses on the first c' latent channels only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcae15.ae.model import channel_mask  # Eq. 1's mask, one definition for the AE and ADT

__all__ = ["ADTConfig", "ADT_MODES", "default_channel_list", "sample_channels", "masked_mse",
           "diffusion_loss", "draw_mask", "LossNorm", "micro_loss"]

ADT_MODES = ("per_batch", "per_sample")


@dataclass(kw_only=True)
class ADTConfig:
    """How c' is drawn and how the masked objective is combined with the full one."""

    enabled: bool = True
    """False = the baseline: plain loss on all c channels."""
    channels: list[int] | None = None
    """Allowed c' values; None = the list the store's autoencoder was trained with (store attrs
    'channel_choices'), else {16, 20, ..., c} (the paper's list)."""
    mode: str = "per_batch"
    """'per_batch': one c' shared by the local batch (official); 'per_sample': one c' per sample."""
    include_full: bool = False
    """True: loss = 1/2 (L_full + L_c') with both terms on the same x_t, noise and t."""

    def __post_init__(self) -> None:
        if self.mode not in ADT_MODES:
            raise ValueError(f"ADTConfig.mode={self.mode!r}; allowed: {ADT_MODES}")
        if self.channels is not None:
            self.channels = sorted({int(c) for c in self.channels})
            if not self.channels or self.channels[0] < 1:
                raise ValueError(f"ADTConfig.channels={self.channels!r} must be a non-empty list of ints >= 1")

    def resolve(self, c: int, store_choices: list[int] | None = None) -> list[int]:
        """The c' list for a latent with ``c`` channels; entries above c fail here (at start, not midway)."""
        if self.channels is not None:
            chans = list(self.channels)
        elif store_choices:
            chans = sorted({int(v) for v in store_choices})
        else:
            chans = default_channel_list(c)
        if chans[-1] > c:
            raise ValueError(f"ADTConfig.channels={chans} has values above the store's {c} latent channels")
        return chans


def default_channel_list(c: int, start: int = 16, step: int = 4) -> list[int]:
    """{16, 20, ..., c} (c always included); a latent with c <= 16 channels gets [c] (ADT is then a no-op)."""
    return sorted(set(range(start, c + 1, step)) | {c}) if c > start else [c]


def sample_channels(chans: list[int] | torch.Tensor, batch: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """c' per sample (B,) drawn uniformly from ``chans`` with ``gen`` (per batch: one draw repeated).

    ``chans`` may be a long tensor already on the generator's device (the trainer's: no copy per step)."""
    n = 1 if mode == "per_batch" else batch
    idx = torch.randint(len(chans), (n,), generator=gen, device=gen.device)  # on the generator's device: no sync
    table = chans if isinstance(chans, torch.Tensor) else torch.tensor(chans, dtype=torch.long, device=gen.device)
    return table[idx].expand(batch).clone()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over the active (mask = 1) elements only."""
    sq = (pred.float() - target.float()).square() * mask
    return sq.sum() / mask.expand_as(pred).sum()


def draw_mask(adt: ADTConfig, chans: list[int], batch: int, c: int, gen: torch.Generator, device,
              dtype=torch.float32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mask (B, c, 1, 1) or None when ADT is off, c' per sample (B,)) drawn with ``gen`` for a whole batch."""
    if not adt.enabled:
        return None, torch.full((batch,), c, dtype=torch.long, device=device)
    cprime = sample_channels(chans, batch, adt.mode, gen)
    return channel_mask(cprime, c, device=device, dtype=dtype), cprime


class LossNorm:
    """Denominators of the batch's losses (active elements of the whole batch), so that the losses of
    micro-batches add up to the loss of the whole batch exactly (gradient accumulation)."""

    def __init__(self, shape: torch.Size, mask: torch.Tensor | None):
        self.full = float(shape.numel())
        self.masked = mask.expand(shape).sum() if mask is not None else None  # device scalar: no sync


def _sq_sum(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    sq = (pred.float() - target.float()).square()
    return (sq * mask).sum() if mask is not None else sq.sum()


def micro_loss(model, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
               mask: torch.Tensor | None, adt: ADTConfig, norm: LossNorm) -> torch.Tensor:
    """This (micro-)batch's share of the batch loss of Eq. 2 (``norm`` holds the whole batch's denominators).

    ``mask`` None = ADT off (plain loss on all channels). With ``include_full`` the full and masked inputs go
    through the model as one concatenated batch (one forward, same x_t / t).
    """
    if mask is None:
        return _sq_sum(model(x_t, t, y), target, None) / norm.full
    if not adt.include_full:
        return _sq_sum(model(x_t * mask, t, y), target, mask) / norm.masked
    b = x_t.shape[0]
    out = model(torch.cat([x_t, x_t * mask]), torch.cat([t, t]), torch.cat([y, y]))  # (2B, C, H, W)
    return 0.5 * (_sq_sum(out[:b], target, None) / norm.full + _sq_sum(out[b:], target, mask) / norm.masked)


def diffusion_loss(model, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                   adt: ADTConfig, chans: list[int], gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Diffusion loss of ``model`` with or without ADT; returns (loss, info with the mean c' as a 0-d tensor).

    Eq. 2: || eps * m - eps_theta(x_t * m, t) * m ||^2 averaged over active elements. With ``include_full`` the
    full and masked inputs go through the model as one concatenated batch (one forward, same x_t / t).
    """
    b, c = x_t.shape[:2]
    mask, cprime = draw_mask(adt, chans, b, c, gen, x_t.device, x_t.dtype)
    loss = micro_loss(model, x_t, t, y, target, mask, adt, LossNorm(x_t.shape, mask))
    return loss, {"c_prime": cprime.float().mean()}
