"""experiments/diagnostics.py (issue 32): the head's unexpressible share on a synthetic case with a known answer,
the token layout against the backbone's own unpatchify, and the checkpoint-free bound."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # experiments/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))


def _exact_data(eigen: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, D] tokens whose centred covariance is exactly diag(eigen) (orthonormal columns orthogonal to 1)."""
    d = len(eigen)
    z = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(np.column_stack([np.ones(n), z]))
    return q[:, 1:] * np.sqrt(eigen * n) + 3.0  # + a mean the diagnostic must ignore


def test_outside_share_known_answer_rank_r_head():
    from experiments.diagnostics import outside_share

    rng = np.random.default_rng(0)
    d, h, r = 12, 20, 5  # a head of rank 5 < D although H > D
    eigen = np.arange(d, 0, -1, dtype=float) ** 2
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))  # the same rotation of data and head
    x = _exact_data(eigen, 400, rng) @ rot.T
    w = np.zeros((d, h))
    w[:r] = rng.standard_normal((r, h))  # span = the first r coordinates before the rotation
    got = outside_share(rot @ w, x)
    assert got["rank"] == r and got["token_dim"] == d and got["hidden"] == h
    assert got["share"] == pytest.approx(eigen[r:].sum() / eigen.sum(), abs=1e-10)
    # full rank: nothing outside; rank 0 refused only through "no variance" when the data are constant
    assert outside_share(rng.standard_normal((d, h)), x)["share"] == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError):
        outside_share(w, np.ones((5, d)))
    with pytest.raises(ValueError):
        outside_share(w, x[:, :3])


def test_patchify_is_the_inverse_of_the_backbones_unpatchify():
    import torch

    from dcae15.models.layers import unpatchify
    from experiments.diagnostics import patchify

    lat = np.random.default_rng(1).standard_normal((2, 3, 4, 6))
    for p in (1, 2):
        tok = patchify(lat, p).reshape(2, -1, p * p * 3)
        back = unpatchify(torch.from_numpy(tok), 3, p, 4 // p, 6 // p).numpy()
        np.testing.assert_array_equal(back, lat)


def test_head_bound_table_old_vs_wide_backbone():
    from experiments.diagnostics import bound_markdown, bound_table, head_bound

    old = [head_bound(96, 2, c) for c in (8, 16, 32, 64)]
    assert old == [0.0, 0.0, 32 / 128, 160 / 256]
    assert [head_bound(96, 1, c) for c in (8, 16, 32, 64)] == [0.0] * 4
    rows = bound_table((64,), {"old": (96, 2)})
    assert rows == [{"c": 64, "old": {"token_dim": 256, "hidden": 96, "bound": 0.625}}]
    assert "160/256 = 0.625" in "\n".join(bound_markdown((64,), {"old": (96, 2)}))
    with pytest.raises(ValueError):
        head_bound(0, 1, 8)
