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
    # float64, two algorithms. eigvals(s1 s2): similar to a PSD matrix through s1^(1/2) (eigenvector condition <=
    # sqrt(cond s1) ~ 250), so each eigenvalue moves by <= 250 D u64 ||s1|| ||s2|| ~ 5e-9, its square root (lambda >=
    # 1.4e-6) by <= 5e-9 / (2 sqrt(1.4e-6)) = 2e-6; x D = 24: 5e-5 absolute at worst, 1.6e-7 of the FID (>= 315).
    # scipy's sqrtm errs by as much; rel 1e-6 covers both (seen <= 1.6e-15 relative)
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    assert ours > 1.0
    # against itself: the eigenvalues of s1 s1 = s1^2 (symmetric) move by <= D u64 ||s1||^2 = 3e-11, their square roots
    # by <= 3e-11 / (2 lambda_i(s1)); twice the sum over i is <= 2.3e-7 (seed 1, lambda_min(s1) = 1.1e-4): 1e-6 is 4x
    # that (seen <= 2.3e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_metrics_feature_stats_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).standard_normal((50, 5)).astype(np.float32)
    mu, sigma = feature_stats(x)
    # numpy's mean and (unbiased) cov of the float64 features: the same calls, the same bits
    np.testing.assert_array_equal(mu, x.astype(np.float64).mean(0))
    np.testing.assert_array_equal(sigma, np.cov(x.astype(np.float64), rowvar=False))
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
