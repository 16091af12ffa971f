"""Our Fréchet distance against a direct scipy computation, and the Gaussian statistics it consumes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from dcae15.metrics.fidelity import feature_stats, frechet_distance, uniform_labels


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_frechet_matches_scipy_on_gaussian_features(seed):
    rng = np.random.default_rng(seed)
    d = 24
    a = rng.standard_normal((600, d)) @ rng.standard_normal((d, d)) + rng.normal(0, 1, d)
    b = rng.standard_normal((500, d)) @ rng.standard_normal((d, d)) * 0.7 + rng.normal(0, 1, d)
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    assert ours > 1.0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_metrics_feature_stats_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).standard_normal((50, 5)).astype(np.float32)
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="N>=2"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_metrics_uniform_labels_fixed_seed():
    a, b = uniform_labels(50_000, 1000, seed=0), uniform_labels(50_000, 1000, seed=0)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 1000
    counts = np.bincount(a, minlength=1000)
    assert counts.min() > 20 and counts.max() < 90  # uniform: ~50 per class
    assert not np.array_equal(a, uniform_labels(50_000, 1000, seed=1))
    with pytest.raises(ValueError):
        uniform_labels(0, 10)
