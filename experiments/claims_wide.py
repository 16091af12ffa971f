"""Issue 32's decision rules for the ``fmnist-wide`` sweep, declared before any run (see ``claims-wide.md``)."""

from __future__ import annotations

__all__ = ["CLAIMS_WIDE", "TARGETS_WIDE", "READINGS", "PRIMARY"]

#: The verdicts, declared before any run (issue 32) and not tuned toward; ``evaluate`` computes exactly these.
CLAIMS_WIDE = {
    "fig1b_generation_wide": "with a backbone wider than the token at every c, the plain c = {c_max} model's final "
                             "FID is worse than c = {c_min}'s beyond the seed spread (else: the toy Figure 1b was an "
                             "artefact of the head width)",
    "table5_speed_wide": "at c = {c_max}, wide backbone: SLS + ADT reaches the baseline's final FID in <= 1/{speedup} "
                         "of the steps the baseline first needs (else, where the old sweep held: the toy Table 5 "
                         "was an artefact of the head width)",
    "table5_alone_wide": "at c = {c_max}, wide backbone: neither SLS alone nor ADT alone does so",
    "table5_recipe_speed": "rule table5_speed_wide with the paper's recipe (literal c' list 16, 20, ..., c and "
                           "include_full on, in the AE and in ADT)",
    "table5_recipe_alone": "rule table5_alone_wide with the paper's recipe",
    "table1_recipe": "at c = {c_max}, the recipe-structured AE's full-channel PSNR is within {full_psnr_gap_db} dB of "
                     "the plain AE's (mean over AE seeds)",
    "table1_recipe_explains": "the recipe's full-channel gap is >= {recipe_gain_db} dB smaller in magnitude than the "
                              "scaled c' list's gap (same budget and AE seeds)",
    "table6_fmnist": "at c = {c_small}, SLS + ADT's final FID is not better than plain's beyond the seed spread "
                     "(the paper's Table 6 direction)",
    "tradeoff_leaves_curve": "SLS + ADT at c = {c_max} has a final FID below the plain AEs' PSNR-vs-FID curve at its "
                             "own PSNR beyond the seed spread (the curve held constant beyond its end points)",
    "judge_accuracy": "the independent judge's held-out accuracy on real Fashion-MNIST is >= {judge_accuracy}",
    "head_width_ok": "every diffusion run has hidden width > token dimension p^2 c (no output direction constant)",
}
TARGETS_WIDE = {"speedup": 2.0, "full_psnr_gap_db": 0.5, "recipe_gain_db": 1.0, "judge_accuracy": 0.9}

#: (judge, CFG) readings of every generation verdict; the first is the primary one that decides.
READINGS = (("judge", 1.0), ("judge", 2.5), ("proxy", 1.0), ("proxy", 2.5))
PRIMARY = READINGS[0]
