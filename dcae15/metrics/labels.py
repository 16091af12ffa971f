"""Class labels of the samples a generator is evaluated on: one rule for the sampler and for the evaluation.

The official protocol (ADM / DiT / DC-AE) draws 50k labels uniformly at random with a fixed seed. The sampler
(``dcae15.diffusion.sample``) writes the labels it drew into the sample store, and whoever draws labels for the
same (count, classes, seed) elsewhere must get the very same ones: so there is exactly one rule, here.
"""

from __future__ import annotations

import numpy as np

from collections.abc import Sequence

__all__ = ["LABEL_MODES", "NUM_SAMPLES", "check_classes", "make_labels", "uniform_labels"]

NUM_SAMPLES = 50_000  # the field's convention for gFID / IS / precision / recall
LABEL_MODES = ("uniform", "balanced", "given")


def check_classes(classes: Sequence[int] | None, num_classes: int | None = None) -> list[int] | None:
    """``classes`` as a list of ints in ``[0, num_classes)`` (None stays None); ValueError naming the bad ones."""
    if classes is None:
        return None
    out = [int(c) for c in classes]
    if not out:
        raise ValueError("classes is empty: give at least one class id, or none for all classes")
    bad = [c for c in out if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {num_classes if num_classes is not None else 'inf'})")
    return out


def make_labels(num_samples: int, num_classes: int, mode: str, seed: int,
                classes: Sequence[int] | None = None) -> np.ndarray:
    """Class labels (int64) for ``num_samples`` samples, deterministic in ``seed``.

    Modes: 'uniform' (i.i.d. uniform, the official FID protocol), 'balanced' (each class num_samples / num_classes
    times, shuffled) — both over ``classes`` when given, else over all ``num_classes`` — or 'given': exactly
    ``classes`` in order, each repeated over a contiguous block (e.g. 8 classes × 8 samples for a grid).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"labels={mode!r}; allowed: {LABEL_MODES}")
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples}, {num_classes}")
    pool = check_classes(classes, num_classes)
    if mode == "given":
        if pool is None:
            raise ValueError("labels='given' needs classes (e.g. --classes 207,360,387)")
        return np.asarray(pool, dtype=np.int64)[np.arange(num_samples) * len(pool) // num_samples]
    rng = np.random.default_rng([seed, 7])
    k = num_classes if pool is None else len(pool)
    idx = rng.integers(0, k, num_samples, dtype=np.int64) if mode == "uniform" else \
        rng.permutation(np.arange(num_samples, dtype=np.int64) % k)
    return idx if pool is None else np.asarray(pool, dtype=np.int64)[idx]


def uniform_labels(num_samples: int = NUM_SAMPLES, num_classes: int = 1000, seed: int = 0) -> np.ndarray:
    """``make_labels(..., "uniform", seed)``: the labels ``sample_to_store(..., labels="uniform", seed=seed)`` draws."""
    return make_labels(num_samples, num_classes, "uniform", seed)
