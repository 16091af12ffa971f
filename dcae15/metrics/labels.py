"""Class labels of the samples a generator is evaluated on: one rule for the sampler and for the evaluation.

The official protocol (ADM / DiT / DC-AE) draws 50k labels uniformly at random with a fixed seed. The sampler
(``dcae15.diffusion.sample``) writes the labels it drew into the sample store, and whoever draws labels for the
same (count, classes, seed) elsewhere must get the very same ones: so there is exactly one rule, here.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LABEL_MODES", "NUM_SAMPLES", "make_labels", "uniform_labels"]

NUM_SAMPLES = 50_000  # the field's convention for gFID / IS / precision / recall
LABEL_MODES = ("uniform", "balanced")


def make_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Class labels (int64) for ``num_samples`` samples: 'uniform' (i.i.d. uniform, the official FID protocol) or
    'balanced' (each class num_samples / num_classes times, shuffled); deterministic in ``seed``."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels={mode!r}; allowed: {LABEL_MODES}")
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples}, {num_classes}")
    rng = np.random.default_rng([seed, 7])
    if mode == "uniform":
        return rng.integers(0, num_classes, num_samples, dtype=np.int64)
    return rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)


def uniform_labels(num_samples: int = NUM_SAMPLES, num_classes: int = 1000, seed: int = 0) -> np.ndarray:
    """``make_labels(..., "uniform", seed)``: the labels ``sample_to_store(..., labels="uniform", seed=seed)`` draws."""
    return make_labels(num_samples, num_classes, "uniform", seed)
