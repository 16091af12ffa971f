"""Each evaluation protocol against its reference code on fixed stored activations.

The reference formulas are ported here, as close to their source as numpy allows:
- ADM: openai/guided-diffusion ``evaluations/evaluator.py`` (``Evaluator.compute_inception_score``,
  ``ManifoldEstimator.manifold_radii`` / ``evaluate_pr``, ``DistanceBlock`` with its fp16 distances and fp32
  fallback, ``FIDStatistics.frechet_distance``). TF's fp16 graph is emulated the way it runs on a GPU: every op's
  result rounded to fp16, the reduction and the matmul accumulated in fp32.
- DC-Gen: dc-ai-projects/DC-Gen ``dc_gen/apps/metrics/fid/precision_recall.py`` (``ManifoldEstimator``, fp32) and
  ``inception_score/inception_score.py`` (torch-fidelity's shuffled splits).
- pytorch-fid: ``pytorch_fid/fid_score.py`` ``calculate_frechet_distance``.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from dcae15.metrics.fidelity import feature_stats, frechet_distance, metrics_from_features
from dcae15.metrics.protocols import (PROTOCOLS, frechet_distance_sqrtm, get_protocol, inception_score_unshuffled,
                                      manifold_precision_recall)


# ---------------------------------------------------------------- ports of the reference code

def _adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """evaluator.py ``compute_inception_score``: softmax (float32, as the TF graph), unshuffled splits."""
    z = logits.astype(np.float32)
    z = z - z.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i: i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16)


def _adm_batch_pairwise_distances(U, V):
    """``_batch_pairwise_distances`` on fp16 tensors (fp32 accumulation, fp16 results)."""
    with np.errstate(over="ignore"):
        return _adm_pairwise_fp16(U, V)


def _adm_pairwise_fp16(U, V):
    norm_u = np.square(U).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
    norm_v = np.square(V).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
    mm = (U.astype(np.float32) @ V.astype(np.float32).T).astype(np.float16)
    with np.errstate(invalid="ignore"):
        return np.maximum(norm_u - np.float16(2) * mm + norm_v, np.float16(0.0))


def _adm_distance_block(U, V):
    """``DistanceBlock.distance_block``: fp16 unless any entry is not finite, then fp32."""
    d16 = _adm_batch_pairwise_distances(_f16(U), _f16(V))
    if np.all(np.isfinite(d16)):
        return d16.astype(np.float32)
    U, V = np.asarray(U, np.float32), np.asarray(V, np.float32)
    nu, nv = np.square(U).sum(1).reshape(-1, 1), np.square(V).sum(1).reshape(1, -1)
    return np.maximum(nu - 2 * U @ V.T + nv, 0.0)


class _AdmManifoldEstimator:
    """``ManifoldEstimator`` with ``nhood_sizes=(3,)``, ``clamp_to_percentile=None``."""

    def __init__(self, row_batch_size=10000, col_batch_size=10000, nhood_sizes=(3,)):
        self.row_batch_size, self.col_batch_size, self.nhood_sizes = row_batch_size, col_batch_size, nhood_sizes

    def manifold_radii(self, features):
        num_images = len(features)
        radii = np.zeros([num_images, len(self.nhood_sizes)], dtype=np.float32)
        distance_batch = np.zeros([self.row_batch_size, num_images], dtype=np.float32)
        seq = np.arange(max(self.nhood_sizes) + 1, dtype=np.int32)
        for begin1 in range(0, num_images, self.row_batch_size):
            end1 = min(begin1 + self.row_batch_size, num_images)
            row_batch = features[begin1:end1]
            for begin2 in range(0, num_images, self.col_batch_size):
                end2 = min(begin2 + self.col_batch_size, num_images)
                distance_batch[0: end1 - begin1, begin2:end2] = _adm_distance_block(row_batch, features[begin2:end2])
            radii[begin1:end1, :] = np.partition(distance_batch[0: end1 - begin1, :], seq, axis=1)[:, self.nhood_sizes]
        return radii

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        features_1_status = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        features_2_status = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin_1 in range(0, len(features_1), self.row_batch_size):
            end_1 = begin_1 + self.row_batch_size
            batch_1 = features_1[begin_1:end_1]
            for begin_2 in range(0, len(features_2), self.col_batch_size):
                end_2 = begin_2 + self.col_batch_size
                batch_2 = features_2[begin_2:end_2]
                dist32 = _adm_distance_block(batch_1, batch_2)[..., None]
                features_1_status[begin_1:end_1] |= np.any(dist32 <= radii_2[begin_2:end_2], axis=1)
                features_2_status[begin_2:end_2] |= np.any(dist32 <= radii_1[begin_1:end_1][:, None], axis=0)
        return (np.mean(features_2_status.astype(np.float64), axis=0),
                np.mean(features_1_status.astype(np.float64), axis=0))

    def compute_prec_recall(self, activations_ref, activations_sample):  # Evaluator.compute_prec_recall
        radii_1 = self.manifold_radii(activations_ref)
        radii_2 = self.manifold_radii(activations_sample)
        pr = self.evaluate_pr(activations_ref, radii_1, activations_sample, radii_2)
        return float(pr[0][0]), float(pr[1][0])


def _dcgen_precision_recall(features_1: torch.Tensor, features_2: torch.Tensor, nhood_size=3, batch=10000):
    """DC-Gen ``ManifoldEstimator.evaluate_pr`` (fp32, no clamp), features_1 = reference."""
    def radii(f):
        out = torch.zeros(len(f))
        sq = (f ** 2).sum(1)
        for b in range(0, len(f), batch):
            row = f[b:b + batch]
            d = (row ** 2).sum(1)[:, None] + sq[None, :] - 2 * row @ f.T
            out[b:b + batch] = torch.topk(d, nhood_size + 1, dim=1, largest=False).values[:, -1]
        return out

    r1, r2 = radii(features_1), radii(features_2)
    s1, s2 = torch.zeros(len(features_1), dtype=bool), torch.zeros(len(features_2), dtype=bool)
    q1, q2 = (features_1 ** 2).sum(1), (features_2 ** 2).sum(1)
    for b1 in range(0, len(features_1), batch):
        for b2 in range(0, len(features_2), batch):
            d = q1[b1:b1 + batch, None] + q2[None, b2:b2 + batch] - 2 * features_1[b1:b1 + batch] @ features_2[b2:b2 + batch].T
            s1[b1:b1 + batch] |= torch.any(d <= r2[None, b2:b2 + batch], dim=1)
            s2[b2:b2 + batch] |= torch.any(d <= r1[b1:b1 + batch, None], dim=0)
    return s2.float().mean().item(), s1.float().mean().item()


def _pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid ``calculate_frechet_distance`` (= ADM ``FIDStatistics.frechet_distance``)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- fixed activations

def _features(seed: int, n: int, d: int = 64, shift: float = 0.0) -> np.ndarray:
    """ReLU'd Gaussian features like Inception's pool_3 (non-negative, a few units of norm)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.maximum(rng.standard_normal((n, d)) @ mix + 0.3 + shift, 0.0).astype(np.float32)


@dataclasses.dataclass
class _Spec:  # what metrics_from_features reads of a feature extractor
    prefix: str = ""
    label: str = "inception-v3-compat"

    def metric_name(self, m):
        return f"{self.prefix}{m}"

    info = {}


def test_metrics_protocols_adm_inception_score_is_unshuffled_5000_splits():
    rng = np.random.default_rng(0)
    # 12 000 logits whose confidence grows along the rows: shuffling would change every split
    logits = rng.standard_normal((12_000, 50)) * np.linspace(0.5, 4.0, 12_000)[:, None]
    ours = inception_score_unshuffled(logits)["inception_score_mean"]
    # ADM's port runs in float32 (u = 6e-8), ours in float64: a split's KL is a mean of sums p (log p - log pbar) whose
    # roundings add up to ~u (H(p) + H(p, pbar)) <= u (2 log 50 + KL) ~ 10 u = 6e-7 absolute, the IS = exp(KL) as much
    # relative; rel 1e-5 is 15x that (seen 8.3e-7)
    assert ours == pytest.approx(_adm_inception_score(logits), rel=1e-5)
    # splits of 5000, 5000, 2000, in order: not torch-fidelity's 10 shuffled splits
    from torch_fidelity.metric_isc import isc_features_to_metric

    shuffled = isc_features_to_metric(torch.as_tensor(logits), 10, True, 2020)["inception_score_mean"]
    assert abs(shuffled - ours) > 1e-3 * ours  # seen: 0.37 ours apart, 370x the line
    # through the scoring function, by protocol
    out = metrics_from_features({"isc": torch.as_tensor(logits)}, {}, (None, None), extractor=_Spec(),
                                metrics=("is",), protocol="adm")
    assert out["is"] == pytest.approx(_adm_inception_score(logits), rel=1e-5)  # float32 vs float64, as above
    dcgen = metrics_from_features({"isc": torch.as_tensor(logits)}, {}, (None, None), extractor=_Spec(),
                                  metrics=("is",), protocol="dc-gen")
    assert dcgen["is"] == shuffled  # DC-Gen = torch-fidelity's shuffled splits: the same call on the same tensor


@pytest.mark.parametrize("block", [10_000, 128])
def test_metrics_protocols_adm_precision_recall_matches_evaluator(block):
    ref, smp = _features(1, 400), _features(2, 300, shift=0.15)
    want = _AdmManifoldEstimator(block, block).compute_prec_recall(ref, smp)
    got = manifold_precision_recall(ref, smp, rule="fp16-fallback", row_batch_size=block, col_batch_size=block)
    # fp32 accumulation order differs between numpy and torch: a distance can round to the neighbouring fp16 value
    # and flip one comparison, so allow two points' worth on each side
    assert abs(got["precision"] - want[0]) <= 2 / len(smp)
    assert abs(got["recall"] - want[1]) <= 2 / len(ref)
    assert 0.05 < want[0] < 0.99 and 0.05 < want[1] < 0.99  # a case where both rules have something to decide


def test_metrics_protocols_adm_fp16_overflow_falls_back_to_fp32_per_block():
    ref, smp = _features(3, 200) * 200.0, _features(4, 150, shift=0.15) * 200.0  # squared norms beyond fp16's 65504
    want = _AdmManifoldEstimator(64, 64).compute_prec_recall(ref, smp)
    got = manifold_precision_recall(ref, smp, rule="fp16-fallback", row_batch_size=64, col_batch_size=64)
    fp32 = _dcgen_precision_recall(torch.as_tensor(ref), torch.as_tensor(smp))
    assert abs(got["precision"] - want[0]) <= 2 / len(smp) and abs(got["recall"] - want[1]) <= 2 / len(ref)
    assert abs(got["precision"] - fp32[0]) <= 2 / len(smp)  # every block fell back: the fp32 numbers


def test_metrics_protocols_dcgen_precision_recall_matches_its_estimator():
    ref, smp = _features(5, 500), _features(6, 350, shift=0.15)
    want = _dcgen_precision_recall(torch.as_tensor(ref), torch.as_tensor(smp))
    got = manifold_precision_recall(ref, smp, rule="fp32")
    # Both compute fp32 squared distances, adding the three terms in another order: <= ~4 u32 x 320 (|terms|) = 8e-5
    # apart. The closest decision here has d - r = 5.7e-4 in float64, 3.5x two such roundings, so no comparison flips
    # and the fractions agree up to DC-Gen's float32 average (1e-6 >> u32)
    assert got["precision"] == pytest.approx(want[0], abs=1e-6)
    assert got["recall"] == pytest.approx(want[1], abs=1e-6)
    out = metrics_from_features({"prc": torch.as_tensor(smp)}, {}, (None, None), extractor=_Spec(),
                                metrics=("precision", "recall"), protocol="dc-gen", pr_features=ref)
    assert (out["precision"], out["recall"]) == pytest.approx(want, abs=1e-6)


def test_metrics_protocols_fid_equals_pytorch_fid_formula_on_the_same_statistics():
    a, b = _features(7, 900, d=48), _features(8, 700, d=48, shift=0.2)
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    want = _pytorch_fid_frechet(mu1, s1, mu2, s2)
    assert frechet_distance_sqrtm(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12, abs=1e-12)  # the same sqrtm
    # torch-fidelity's form (eigenvalues of s1 s2, in [8e-3, 1.4]) agrees: float64 eigvals' backward error ~ D u64
    # ||s1 s2|| = 48 x 1.1e-16 x 1.4 ~ 7e-15 per eigenvalue, x 1 / (2 sqrt(8e-3)) = 5.5 through the square root, x D:
    # ~2e-12 of the trace, 2e-13 of the FID (9.7); sqrtm's own error is of the same order (cond ~ 1e2). rel 1e-10 is
    # above both (seen 4.4e-15)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    for protocol in ("dc-gen", "adm"):
        out = metrics_from_features({"fid": torch.as_tensor(a)}, {}, (mu2, s2), extractor=_Spec(),
                                    metrics=("fid",), protocol=protocol)
        assert out["fid"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    # a singular product (fewer samples than dimensions) takes the eps branch of the reference, with its warning
    c = _features(9, 20, d=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _pytorch_fid_frechet(*feature_stats(c), mu2, s2)
        got = frechet_distance_sqrtm(*feature_stats(c), mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)


def test_metrics_protocols_registry_and_mismatches_are_refused():
    assert {"dc-gen", "adm", "proxy", "torch-fidelity"} <= set(PROTOCOLS)
    adm, dcgen = get_protocol("adm"), get_protocol("dc-gen")
    assert (adm.reference, adm.pr_reference, adm.is_rule, adm.pr_rule) == (
        "adm-batch", "adm-batch", "unshuffled-5000", "fp16-fallback")
    assert (dcgen.reference, dcgen.pr_reference, dcgen.is_rule, dcgen.pr_rule) == (
        "train-split", "adm-batch", "shuffled-10", "fp32")
    with pytest.raises(ValueError, match="allowed: dc-gen, adm"):
        get_protocol("fid50k")
    with pytest.raises(ValueError, match="needs the inception"):
        metrics_from_features({"fid": torch.ones(3, 2)}, {}, (None, None), extractor=_Spec(prefix="proxy-"),
                              metrics=("fid",), protocol="adm")
    with pytest.raises(ValueError, match="rule must be"):
        manifold_precision_recall(np.ones((5, 2)), np.ones((5, 2)), rule="fp64")


def test_metrics_protocols_dcgen_inception_input_is_dcgens(stand_in_inception):
    """DC-Gen's FID code feeds its Inception ``x / 255``, ``Normalize(0.5, 0.5)``, bilinear to 299
    (``dc_gen/apps/metrics/fid/fid.py`` ``add_data``): the ``pytorch-fid`` input pipeline's first convolution sees
    exactly that tensor; the standard one sees torch-fidelity's TF1-style input, and the features differ."""
    import torch.nn.functional as F
    import torchvision.transforms as T

    from dcae15.metrics.fidelity import inception_extractor

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 40), dtype=np.uint8))
    want = F.interpolate(T.Normalize(mean=0.5, std=0.5)(x / 255), size=(299, 299), mode="bilinear",
                         align_corners=False)  # DC-Gen's steps, in its order
    seen, feats = {}, {}
    for pipeline in ("pytorch-fid", "torch-fidelity"):
        spec = inception_extractor(stand_in_inception, input=pipeline)
        net = spec.build(["2048"])
        net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a, p=pipeline: seen.__setitem__(p, a[0].clone()))
        with torch.no_grad():
            feats[pipeline] = net(x)[0]
    torch.testing.assert_close(seen["pytorch-fid"], want, rtol=0, atol=1e-6)
    assert (seen["torch-fidelity"] - want).abs().max() > 1e-3  # TF1 resize, (x - 128) / 128
    diff = (feats["pytorch-fid"] - feats["torch-fidelity"]).abs().max()
    assert diff > 1e-3 * feats["torch-fidelity"].abs().max()  # stand-in weights: tiny features, compare relatively
    a, b = inception_extractor(stand_in_inception), inception_extractor(stand_in_inception, input="pytorch-fid")
    assert a.fingerprint != b.fingerprint and a.label != b.label and not b.has_sfid  # references cached apart
    with pytest.raises(ValueError, match="input must be"):
        inception_extractor(stand_in_inception, input="tf")
