"""The c' sampler: uniform over the list (chi-square bound), per-sample shapes, full-c pass, determinism."""

from __future__ import annotations

import pytest
import torch

from dcae15.ae.channels import ChannelSampling, step_generator


def test_per_batch_frequencies_are_uniform():
    s = ChannelSampling(choices=(8, 12, 16, 20, 24, 28, 32))
    n = 7000
    draws = [s.draw(step_generator(0, step), 4)[0] for step in range(n)]
    counts = torch.tensor([draws.count(c) for c in s.choices], dtype=torch.float64)
    expected = n / len(s.choices)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 6 degrees of freedom: P(chi2 > 22.46) = 0.001; the draws are seeded, so this is deterministic anyway
    assert chi2 < 22.46, (counts, chi2)
    assert set(draws) == set(s.choices)


def test_per_sample_and_full_pass():
    s = ChannelSampling(choices=(4, 8, 16), mode="per_sample", per_step=2, include_full=True)
    out = s.draw(step_generator(3, 5), 1000)
    assert len(out) == 3 and out[-1] == 16
    for t in out[:2]:
        assert t.shape == (1000,) and set(t.tolist()) == {4, 8, 16}
        assert all(abs((t == c).sum().item() - 333) < 60 for c in (4, 8, 16))
    again = s.draw(step_generator(3, 5), 1000)
    assert all(torch.equal(a, b) for a, b in zip(out[:2], again[:2]))  # a pure function of (seed, step)


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="mode"):
        ChannelSampling(choices=(4,), mode="sometimes")
    with pytest.raises(ValueError, match="choices"):
        ChannelSampling(choices=())
