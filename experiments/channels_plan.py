"""The channel sweep's plan (issue 21), shared by the runner (``experiments.channels``) and its report
(``experiments.channels_report``): the settings, the claims declared before any run, and the runs' names by stage.

Neither of those two modules imports the other: both import this one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from experiments import replicate as R

__all__ = ["CLAIMS", "TARGETS", "STAGES", "Sweep", "SWEEPS", "paper_channel_choices", "ae_name", "eval_channels",
           "planned_markers"]

#: The stages in the order the workers run them and the report lists them.
STAGES = ("fig1b", "fig2", "table5", "table1")


def paper_channel_choices(c: int) -> tuple[int, ...]:
    """The paper's c' list rule (c = 128 uses 16, 20, ..., 128): from c/8 in steps of c/32 (integer, >= 1)."""
    lo, step = max(1, c // 8), max(1, c // 32)
    return tuple(range(lo, c + 1, step)) if (c - lo) % step == 0 else (*range(lo, c + 1, step), c)


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """One setting of the experiment: the data, the channel sweep and the budgets (``scale``: replicate's fields,
    identical for every AE and every diffusion run)."""

    per_class: int = 600
    """Fashion-MNIST training images per class (10 classes)."""
    channels: tuple[int, ...] = (8, 16, 32, 64)
    dit_seeds: tuple[int, ...] = (0, 1, 2)
    t5_ae_seeds: tuple[int, ...] = (0, 1)
    """AE seeds per kind in Table 5 (seed 0's plain AE is stage 1's)."""
    t1_ae_steps: tuple[int, ...] = (1000, 2000, 4000)
    """Longer AE budgets (plain and structured, AE seed 0, at the largest c) for the Table 1 budget probe."""
    recon_images: int = 512
    scale: R.Scale = field(default_factory=R.Scale)

    @property
    def c_max(self) -> int:
        return max(self.channels)


#: The verdicts, declared before any run (issue 21) and not tuned toward; the report evaluates exactly these.
CLAIMS = {
    "fig1b_recon": "reconstruction improves with c: the plain AE's full-channel PSNR at the largest c is >= "
                   "{recon_gain_db} dB above the smallest c's, and its proxy-rFID is lower",
    "fig1b_generation": "generation gets worse as c grows: the final proxy-FID (mean over diffusion seeds) at the "
                        "largest c is above the smallest c's by more than the sum of their seed std's, and the "
                        "final class accuracy is below it by more than the sum of their std's",
    "table1": "at the largest c, the structured AE's full-channel PSNR is within {full_psnr_gap_db} dB of the plain "
              "AE's (mean over AE seeds)",
    "table5_speed": "at the largest c, SLS + ADT reaches the baseline's final proxy-FID (class accuracy) in <= "
                    "1/{speedup} of the steps the baseline first needs (mean over 2 AE seeds x 3 diffusion seeds)",
    "table5_alone": "at the largest c, neither SLS nor ADT alone does so",
}
TARGETS = {"recon_gain_db": 1.0, "full_psnr_gap_db": 0.5, "speedup": 2.0}


_SWEEP_SCALE = R.Scale(
    resolution=32, ae_preset="sweep-f4c8", ae_steps=500, ae_batch=32, ae_lr=2e-3, ae_warmup=100,
    ae_schedule="cosine", proxy_epochs=6, proxy_width=16, dit_model="SiT-tiny", dit_patch=2, dit_steps=600,
    dit_batch=64, dit_lr=2e-3, dit_warmup=50, dit_ema=0.99, eval_every=200, eval_samples=256, sampler="heun",
    sample_steps=16, cfg_scale=2.5, structure_eval=False, seeds=(0, 1, 2))


SWEEPS: dict[str, Sweep] = {
    # the setting: Fashion-MNIST 6000 images padded to 32 px; f4 AEs c = 8..64 (8x8xc latents); SiT-tiny
    # on 2x2 patches as the demo's. Budgets chosen from a measured probe (RESULTS.md, "Cost").
    "fmnist": Sweep(scale=_SWEEP_SCALE),
    # seconds: the test's setting (numbers meaningless), the same code path
    "smoke": Sweep(per_class=4, channels=(4, 8), dit_seeds=(0,), t5_ae_seeds=(0,), recon_images=16, t1_ae_steps=(5,),
                   scale=dataclasses.replace(
                       _SWEEP_SCALE, ae_steps=3, ae_batch=8, ae_warmup=1, proxy_epochs=1, proxy_width=4,
                       dit_overrides={"hidden": 32, "depth": 2, "heads": 2}, dit_steps=4, dit_batch=16,
                       dit_warmup=0, eval_every=2, eval_samples=16, sample_steps=2, seeds=(0, 1))),
}


def ae_name(kind: str, c: int, a: int, steps: int | None = None) -> str:
    """``plain-c64-a0``; with ``steps`` (a Table 1 budget other than the sweep's): ``plain-c64-a0-4000st``."""
    return f"{kind}-c{c}-a{a}" + ("" if steps is None else f"-{steps}st")


def eval_channels(c: int) -> tuple[int, ...]:
    """The c' at which reconstruction is scored: c/8, c/4, c/2, c."""
    return tuple(sorted({max(1, c // 8), max(1, c // 4), max(1, c // 2), c}))


def planned_markers(sw: Sweep) -> dict[str, list[str]]:
    """{stage: the marker names of its runs} — what the report lists as "not yet run" while they are missing."""
    cm = sw.c_max
    want = {"fig1b": [f"ae-{ae_name('plain', c, 0)}" for c in sw.channels]
            + [f"dit-{ae_name('plain', c, 0)}-noadt-s{s}" for s in sw.dit_seeds for c in sw.channels],
            "fig2": [f"ae-{ae_name('structured', c, 0)}" for c in sw.channels],
            "table5": [f"ae-{ae_name(k, cm, a)}" for a in sw.t5_ae_seeds for k in ("plain", "structured")]
            + [f"dit-{ae_name(k, cm, a)}-{'adt' if adt else 'noadt'}-s{s}" for s in sw.dit_seeds
               for a in sw.t5_ae_seeds for k in ("plain", "structured") for adt in (False, True)],
            "table1": [f"recon-{ae_name(k, cm, 0, n)}" for n in sorted(sw.t1_ae_steps, reverse=True)
                       for k in ("plain", "structured")]}
    return {stage: want[stage] for stage in STAGES}
