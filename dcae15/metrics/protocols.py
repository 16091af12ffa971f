"""Evaluation protocols by name: the rules of a published table, and the formulas each of them computes.

A number a lab can quote is the number the table's own code computes. Two families of tables matter here:

- ``dc-gen``: the DC-AE and DC-AE 1.5 tables, computed by DC-Gen's pipeline (``dc_gen/apps/metrics``, earlier
  ``mit-han-lab/efficientvit`` ``efficientvit/apps/metrics``): FID of pool features against DC-Gen's own
  **train-split** statistics (``applications/dc_ae/generate_reference.py``) with pytorch-fid's formula
  (``calculate_frechet_distance``: ``scipy.linalg.sqrtm``), IS from torch-fidelity's ``logits_unbiased`` over 10
  splits after a ``RandomState(2020)`` shuffle, precision/recall (k = 3, fp32 squared distances,
  ``fid/precision_recall.py``) against features of ADM's **VIRTUAL** reference batch (``precision_recall_ref_path``).
- ``adm``: the DiT / SiT / LightningDiT / REPA-E tables, computed by openai/guided-diffusion
  ``evaluations/evaluator.py``: FID against the VIRTUAL batch's ``mu``/``sigma`` (``FIDStatistics.frechet_distance``,
  the same sqrtm formula), IS over **unshuffled** 5 000-image splits (``compute_inception_score``), precision/recall
  with its ``ManifoldEstimator`` (k = 3, squared distances in **fp16 with an fp32 fallback** per 10 000 x 10 000
  block, ``DistanceBlock``) of the 10 000 VIRTUAL images against all samples.

Two more names keep older results honest: ``proxy`` (the demo's proxy classifier, torch-fidelity's formulas, numbers
named ``proxy-*``) and ``torch-fidelity`` (Inception through torch-fidelity's formulas against our train-split
statistics: what dcae15 computed before protocols existed; it matches no paper's table).

The formulas below take stored activations (numpy or torch) and are checked against ports of the reference code in
``tests/metrics/test_metrics_protocols.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np
import torch

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "frechet_distance_sqrtm",
    "get_protocol",
    "inception_score_unshuffled",
    "manifold_precision_recall",
]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The rules of one published table (every field is recorded with the numbers).

    Attributes:
        name: ``dc-gen``, ``adm``, ``proxy`` or ``torch-fidelity``.
        tables: which published tables use it.
        extractor: ``inception`` or ``proxy``.
        reference: what FID compares with: ``train-split`` (statistics of the dataset's train split, computed
            once) or ``adm-batch`` (the ``mu``/``sigma`` of an ADM reference batch the user supplies).
        pr_reference: whose features precision/recall compares with (``train-split`` or ``adm-batch``).
        is_rule: ``shuffled-10`` (torch-fidelity / DC-Gen: 10 splits after a seed-2020 permutation) or
            ``unshuffled-5000`` (ADM: consecutive splits of 5 000 images).
        pr_rule: ``torch-fidelity`` (its ``prc_features_to_metric``), ``fp32`` (DC-Gen's ManifoldEstimator) or
            ``fp16-fallback`` (ADM's ManifoldEstimator).
        fid_rule: ``eigvals`` (torch-fidelity's trace of the square root) or ``sqrtm`` (pytorch-fid / ADM).
        num_samples: the sample count of the table (FID-50K).
        inception: the Inception port the reference code runs.
    """

    name: str
    tables: str
    extractor: str
    reference: str
    pr_reference: str
    is_rule: str
    pr_rule: str
    fid_rule: str
    num_samples: int = 50_000
    inception: str = "inception-v3-compat"


PROTOCOLS: dict[str, Protocol] = {
    "dc-gen": Protocol(
        name="dc-gen", tables="DC-AE, DC-AE 1.5 (DC-Gen's evaluation code)", extractor="inception",
        reference="train-split", pr_reference="adm-batch", is_rule="shuffled-10", pr_rule="fp32", fid_rule="sqrtm",
        inception="pytorch-fid InceptionV3 (FID, precision/recall) + torch-fidelity inception-v3-compat (IS)"),
    "adm": Protocol(
        name="adm", tables="ADM, DiT, SiT, LightningDiT, REPA, REPA-E (guided-diffusion evaluations/evaluator.py)",
        extractor="inception", reference="adm-batch", pr_reference="adm-batch", is_rule="unshuffled-5000",
        pr_rule="fp16-fallback", fid_rule="sqrtm", inception="TF InceptionV3 graph (2015-12-05)"),
    "proxy": Protocol(
        name="proxy", tables="none: the demo's proxy classifier (numbers named proxy-*)", extractor="proxy",
        reference="train-split", pr_reference="train-split", is_rule="shuffled-10", pr_rule="torch-fidelity",
        fid_rule="eigvals", num_samples=0, inception="none"),
    "torch-fidelity": Protocol(
        name="torch-fidelity", tables="none: torch-fidelity's formulas against our train-split statistics",
        extractor="inception", reference="train-split", pr_reference="train-split", is_rule="shuffled-10",
        pr_rule="torch-fidelity", fid_rule="eigvals"),
}


def get_protocol(name: str) -> Protocol:
    """The protocol named ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; allowed: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ---------------------------------------------------------------- FID

def frechet_distance_sqrtm(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                           eps: float = 1e-6) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` (= ADM's ``FIDStatistics.frechet_distance``, DC-Gen's
    ``frechet_distance``): ``|mu1-mu2|² + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))`` with ``scipy.linalg.sqrtm``; when
    the product is singular, ``eps`` is added to both diagonals; a small imaginary part is dropped.

    Raises:
        ValueError: shapes that differ, or an imaginary part larger than 1e-3 on the diagonal (as pytorch-fid).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- IS

def inception_score_unshuffled(logits: torch.Tensor | np.ndarray, split_size: int = 5000) -> dict[str, float]:
    """ADM's Inception Score: softmax of the unbiased logits, consecutive (unshuffled) splits of ``split_size``
    images (the last one may be shorter), ``exp(mean KL(p(y|x) || p(y)))`` per split, the mean over splits.

    Computed in float64 (ADM's softmax is float32; the two agree to ~1e-6 relative wherever float32 does not
    underflow). ``is_std`` (not reported by ADM) is the population standard deviation over the splits.
    """
    x = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).double().cpu()
    if x.dim() != 2 or len(x) < 1:
        raise ValueError(f"logits must be [N>=1, classes], got shape {tuple(x.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for a in range(0, len(x), split_size):
        part, log_part = p[a:a + split_size], log_p[a:a + split_size]
        kl = (part * (log_part - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return {"inception_score_mean": float(np.mean(scores)), "inception_score_std": float(np.std(scores))}


# ---------------------------------------------------------------- precision / recall

def _round16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _sq_distances_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's ``_batch_pairwise_distances`` on fp16-cast inputs, as its TF graph computes them on a GPU: every op's
    result rounded to fp16, reductions and the matmul accumulated in fp32. Returned as float32 values."""
    u16, v16 = _round16(u), _round16(v)
    nu = _round16(_round16(u16 * u16).sum(1))  # tf.reduce_sum(tf.square(U), 1)
    nv = _round16(_round16(v16 * v16).sum(1))
    mm = _round16(u16 @ v16.T)  # tf.matmul(U, V, False, True)
    d = _round16(_round16(nu[:, None] - _round16(2 * mm)) + nv[None, :])
    return torch.clamp_min(d, 0.0)  # tf.maximum(..., 0.0)


def _sq_distances_fp32(u: torch.Tensor, v: torch.Tensor, clamp: bool) -> torch.Tensor:
    d = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return torch.clamp_min(d, 0.0) if clamp else d


def _distance_block(u: torch.Tensor, v: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "fp16-fallback":  # DistanceBlock: fp16 unless any distance of the block is not finite
        d = _sq_distances_fp16(u, v)
        return d if bool(torch.isfinite(d).all()) else _sq_distances_fp32(u, v, clamp=True)
    return _sq_distances_fp32(u, v, clamp=False)  # DC-Gen: plain fp32, no clamp


def _radii(feats: torch.Tensor, k: int, rule: str, row_batch_size: int, col_batch_size: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself counted at rank 0)."""
    n = len(feats)
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for a in range(0, n, row_batch_size):
        row = feats[a:a + row_batch_size]
        d = torch.cat([_distance_block(row, feats[b:b + col_batch_size], rule)
                       for b in range(0, n, col_batch_size)], dim=1)
        radii[a:a + len(row)] = torch.kthvalue(d, k + 1, dim=1).values  # np.partition(..., k)[:, k]
    return radii


def manifold_precision_recall(ref_features: torch.Tensor | np.ndarray, sample_features: torch.Tensor | np.ndarray, *,
                              k: int = 3, rule: str = "fp16-fallback", row_batch_size: int = 10_000,
                              col_batch_size: int = 10_000, device: str | torch.device | None = None
                              ) -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) as ADM's / DC-Gen's ``ManifoldEstimator`` computes it.

    Each set's manifold is the union of balls around its points with the squared distance to the k-th nearest
    neighbour as radius; precision is the fraction of samples inside the reference manifold, recall the fraction of
    reference points inside the samples' manifold (a point is inside when ``d² <= radius²``).

    Args:
        rule: ``fp16-fallback`` (ADM: distances of each ``row_batch_size`` x ``col_batch_size`` block in fp16, the
            block recomputed in fp32 when any of them is not finite) or ``fp32`` (DC-Gen).
        row_batch_size, col_batch_size: the reference code's blocks (10 000); with ``fp16-fallback`` the fallback
            is decided per block, so other sizes can change the numbers where fp16 overflows.

    Returns:
        ``{"precision": ..., "recall": ...}``.
    """
    if rule not in ("fp16-fallback", "fp32"):
        raise ValueError(f"rule must be 'fp16-fallback' (ADM) or 'fp32' (DC-Gen), got {rule!r}")
    if k < 1 or row_batch_size < 1 or col_batch_size < 1:
        raise ValueError(f"k, row_batch_size and col_batch_size must be >= 1, got {k}, {row_batch_size}, "
                         f"{col_batch_size}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with _full_fp32_matmul():  # TF32 (switched on for sampling) would round the fp32 dot products of both rules
        return _precision_recall(ref_features, sample_features, k, rule, row_batch_size, col_batch_size, dev)


@contextlib.contextmanager
def _full_fp32_matmul():
    """float32 matmuls in full precision (no TF32) inside, whatever the process switched on; restored after."""
    old = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cuda.matmul.allow_tf32 = old[1]


def _precision_recall(ref_features, sample_features, k: int, rule: str, row_batch_size: int, col_batch_size: int,
                      dev: torch.device) -> dict[str, float]:
    ref = torch.as_tensor(np.asarray(ref_features) if not torch.is_tensor(ref_features) else ref_features)
    smp = torch.as_tensor(np.asarray(sample_features) if not torch.is_tensor(sample_features) else sample_features)
    ref, smp = ref.to(dev, torch.float32), smp.to(dev, torch.float32)
    if ref.dim() != 2 or smp.dim() != 2 or ref.shape[1] != smp.shape[1] or min(len(ref), len(smp)) <= k:
        raise ValueError(f"features must be [N > k, D] with equal D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    r_ref = _radii(ref, k, rule, row_batch_size, col_batch_size)
    r_smp = _radii(smp, k, rule, row_batch_size, col_batch_size)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=dev)  # reference point inside the samples' manifold
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=dev)  # sample inside the reference manifold
    for a in range(0, len(ref), row_batch_size):
        for b in range(0, len(smp), col_batch_size):
            d = _distance_block(ref[a:a + row_batch_size], smp[b:b + col_batch_size], rule)  # (rows, cols)
            ref_in[a:a + len(d)] |= (d <= r_smp[None, b:b + d.shape[1]]).any(1)
            smp_in[b:b + d.shape[1]] |= (d <= r_ref[a:a + len(d), None]).any(0)
    return {"precision": float(smp_in.double().mean()), "recall": float(ref_in.double().mean())}
