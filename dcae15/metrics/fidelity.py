"""Generation metrics (FID, IS, precision/recall, KID) through torch-fidelity, with offline weights.

Conventions (ADM / DiT / DC-AE evaluation): 50k samples, class labels uniform at random with a fixed seed, the
reference is the **train** split centre-cropped at the target resolution (see ``dcae15.metrics.reference``),
IS over 10 splits, precision/recall with k=3 nearest neighbours, features of torch-fidelity's InceptionV3
(``inception-v3-compat``: 2048-d pool features for FID/PR/KID, unbiased logits for IS).

Numbers from the demo's proxy classifier (``dcae15.metrics.proxy``) come out of the same code path but are named
``proxy-fid``, ``proxy-is``, ... so they can never be confused with Inception numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

# the extractors live in the leaf module ``extractor``; re-exported here, the metrics' public face
from dcae15.metrics.extractor import (
    INCEPTION_NAME,
    INCEPTION_WEIGHTS,
    FeatureExtractorSpec,
    MissingWeightsError,
    inception_extractor,
)
from dcae15.metrics.inputs import as_image_dataset
from dcae15.metrics.labels import NUM_SAMPLES, uniform_labels
from dcae15.metrics.protocols import (
    frechet_distance_sqrtm,
    get_protocol,
    inception_score_unshuffled,
    manifold_precision_recall,
)
from dcae15.metrics.reference import ReferenceStats
from dcae15.parallel import default_device

__all__ = [
    "DEFAULT_METRICS",
    "INCEPTION_NAME",
    "INCEPTION_WEIGHTS",
    "METRICS",
    "NUM_SAMPLES",
    "FeatureExtractorSpec",
    "MissingWeightsError",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "generation_metrics",
    "inception_extractor",
    "metrics_from_features",
    "uniform_labels",
]

METRICS = ("fid", "sfid", "is", "precision", "recall", "kid")
DEFAULT_METRICS = ("fid", "sfid", "is", "precision", "recall")  # sfid only where the extractor has it (Inception)
_LAYER_FOR = {"fid": "fid", "sfid": "sfid", "is": "isc", "precision": "prc", "recall": "prc", "kid": "kid"}


def extract_features(
    images: Any,
    extractor: FeatureExtractorSpec,
    *,
    families: Sequence[str] = ("fid",),
    batch_size: int = 64,
    device: str | torch.device | None = None,
    resolution: int | None = None,
    feature_net: torch.nn.Module | None = None,
    verbose: bool = False,
) -> dict[str, torch.Tensor]:
    """Features of ``images`` for the given metric families (``fid``, ``isc``, ``prc``, ``kid``), keyed by family.

    ``images`` is anything ``dcae15.metrics.inputs.as_image_dataset`` accepts. Extraction is torch-fidelity's
    (its DataLoader with ``save_cpu_ram=True``: no worker processes).
    """
    unknown = set(families) - {"fid", "sfid", "isc", "prc", "kid"}
    if unknown:
        raise ValueError(f"families must be among fid, sfid, isc, prc, kid; got {sorted(unknown)}")
    if "sfid" in families and not extractor.has_sfid:
        raise ValueError(f"{extractor.label} provides no sFID (spatial) features: only the Inception network does")
    dev = default_device(device)
    layers = [extractor.layers[f] for f in families]
    net = feature_net if feature_net is not None else extractor.build(layers, dev)
    ds = as_image_dataset(images, resolution=resolution)
    if len(ds) < 2:
        raise ValueError(f"need at least 2 images for feature statistics, got {len(ds)}")
    feats = get_featuresdict_from_dataset(ds, net, batch_size, dev.type == "cuda", True, verbose)
    return {f: feats[extractor.layers[f]] for f in families}


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 of features [N, D] — the Gaussian FID compares."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|² + tr(s1 + s2 - 2 (s1 s2)^½).

    tr((s1 s2)^½) is the sum of square roots of the eigenvalues of s1 s2 (real and ≥ 0 up to round-off, since s1 s2
    is similar to a PSD matrix) — torch-fidelity's formula, which needs no matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    eig = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
    tr_covmean = np.sqrt(eig).real.sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def generation_metrics(
    samples: Any,
    reference: Any,
    *,
    extractor: FeatureExtractorSpec,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    resolution: int | None = None,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_batch_size: int = 1000,
    seed: int = 2020,
    protocol: str | None = None,
    pr_reference: ReferenceStats | None = None,
    isc_extractor: FeatureExtractorSpec | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """FID / IS / precision / recall / KID of ``samples`` against ``reference``, by the rules of ``protocol``.

    Args:
        samples: generated images: a uint8 array/tensor [N,H,W,3], a torch Dataset of uint8 [3,H,W], or the URL
            of a sample store / image folder / packed dataset.
        reference: a ``ReferenceStats`` (cached train-split statistics, ``dcae15.metrics.reference``), or any
            image source as above (e.g. originals for rFID) — its features are then computed here.
        extractor: ``inception_extractor()`` or the proxy's spec (``dcae15.metrics.proxy.proxy_extractor``).
        metrics: subset of ``fid``, ``sfid``, ``is``, ``precision``, ``recall``, ``kid``. ``sfid`` (ADM's spatial
            FID) is computed only by extractors that provide it (Inception) and skipped for the proxy.
        resolution: centre-crop size for folder / packed-dataset inputs.
        prc_batch_size: rows of each block of pairwise feature distances for precision/recall (the same numbers
            for any size; memory ~ 3 x 4 B x ``prc_batch_size`` x N: torch-fidelity's 10 000 took ~3 GB at N =
            20 000, bench/RESULTS.md); torch-fidelity's formulas only (``adm`` / ``dc-gen`` use the reference
            code's 10 000-row blocks).
        protocol: a name of ``dcae15.metrics.protocols.PROTOCOLS`` (``dc-gen``, ``adm``, ``torch-fidelity``,
            ``proxy``): which IS split rule, precision/recall rule and FID formula apply (``metrics_from_features``);
            None: ``proxy`` for the proxy extractor, ``torch-fidelity`` for Inception.
        pr_reference: the reference of precision/recall when it is not ``reference`` (``dc-gen``: the ADM VIRTUAL
            batch, ``dcae15.metrics.adm.adm_reference``).
        isc_extractor: the network of IS when it is not ``extractor`` (``dc-gen``: DC-Gen takes FID and
            precision/recall features from its pytorch-fid-style input, IS from torch-fidelity's own Inception).

    Returns:
        ``{name: value}`` with names prefixed by ``extractor.prefix`` (``fid`` or ``proxy-fid``); IS also reports
        ``is_std``, KID ``kid_std``; a proxy extractor adds ``proxy-classifier_accuracy`` (its held-out accuracy),
        so the number that qualifies the proxy metrics travels with them into the results table.
    """
    metrics = tuple(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)}")
    if not extractor.has_sfid:
        metrics = tuple(m for m in metrics if m != "sfid") or ("fid",)
    if isc_splits < 1 or prc_neighborhood < 1 or prc_batch_size < 1:
        raise ValueError(f"isc_splits, prc_neighborhood and prc_batch_size must be >= 1, got {isc_splits}, "
                         f"{prc_neighborhood}, {prc_batch_size}")
    families = list(dict.fromkeys(_LAYER_FOR[m] for m in metrics))
    dev = default_device(device)
    own = [f for f in families if not (f == "isc" and isc_extractor is not None)]
    net = extractor.build([extractor.layers[f] for f in own], dev) if own else None
    feats = extract_features(
        samples, extractor, families=own, batch_size=batch_size, device=dev, resolution=resolution,
        feature_net=net, verbose=verbose,
    ) if own else {}
    if len(own) < len(families):  # IS from its own network (a second pass over the samples)
        feats["isc"] = extract_features(samples, isc_extractor, families=["isc"], batch_size=batch_size, device=dev,
                                        resolution=resolution, verbose=verbose)["isc"]
    ref_families = [f for f in families if f != "isc"]
    ref_s: tuple[np.ndarray, np.ndarray] | None = None
    ref, ref_mu, ref_sigma = {}, None, None
    if pr_reference is not None:
        pr_reference.check_extractor(extractor)
    if isinstance(reference, ReferenceStats):
        reference.check_extractor(extractor)
        ref = {f: reference.features for f in ref_families if f not in ("fid", "sfid")}
        ref_mu, ref_sigma = reference.mu, reference.sigma
        if "sfid" in metrics:
            if reference.mu_s is None:
                raise ValueError(f"reference {reference.url or ''} holds no spatial statistics (mu_s/sigma_s) for "
                                 "sFID: recompute it with this version, or leave sfid out of the metrics")
            ref_s = (reference.mu_s, reference.sigma_s)
    elif ref_families:
        ref = extract_features(
            reference, extractor, families=ref_families, batch_size=batch_size, device=dev, resolution=resolution,
            feature_net=net, verbose=verbose,
        )
        ref_mu, ref_sigma = feature_stats(ref["fid"]) if "fid" in ref else (None, None)
        ref_s = feature_stats(ref["sfid"]) if "sfid" in ref else None
    sample_feats = {f: feats[f] for f in feats}
    ref_feats = {f: ref[f] for f in ref_families if f not in ("fid", "sfid")}
    return metrics_from_features(
        sample_feats, ref_feats, (ref_mu, ref_sigma), extractor=extractor, metrics=metrics, ref_spatial=ref_s,
        protocol=protocol, pr_features=None if pr_reference is None else pr_reference.features,
        isc_splits=isc_splits, prc_neighborhood=prc_neighborhood, kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size, prc_batch_size=prc_batch_size, seed=seed, device=dev, verbose=verbose)


def metrics_from_features(
    feats: dict[str, Any],
    ref: dict[str, Any],
    ref_stats: tuple[np.ndarray | None, np.ndarray | None],
    *,
    extractor: FeatureExtractorSpec,
    metrics: Sequence[str] = DEFAULT_METRICS,
    ref_spatial: tuple[np.ndarray, np.ndarray] | None = None,
    protocol: str | None = None,
    pr_features: Any = None,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_batch_size: int = 1000,
    seed: int = 2020,
    device: str | torch.device | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """The numbers of ``generation_metrics`` from stored activations, by the rules of ``protocol``.

    Args:
        feats: the samples' features by family (``fid``, ``sfid``, ``isc`` (logits), ``prc``, ``kid``).
        ref: the reference's features by family (``prc``, ``kid``) when those metrics are asked for.
        ref_stats: the reference's (mu, sigma) for FID.
        ref_spatial: its (mu_s, sigma_s) for sFID.
        protocol: ``dcae15.metrics.protocols.PROTOCOLS``: ``adm`` takes ADM's unshuffled 5 000-image IS splits and
            its fp16 precision/recall, ``dc-gen`` DC-Gen's fp32 precision/recall, both the sqrtm FID;
            ``torch-fidelity`` / ``proxy`` torch-fidelity's formulas.
        pr_features: reference features for precision/recall instead of ``ref["prc"]`` (``dc-gen``: the ADM
            VIRTUAL batch's images while FID compares with the train split).
    """
    proto = get_protocol(protocol or ("proxy" if extractor.prefix == "proxy-" else "torch-fidelity"))
    if (proto.extractor == "proxy") != (extractor.prefix == "proxy-"):
        raise ValueError(f"protocol {proto.name!r} needs the {proto.extractor} feature network, got {extractor.label}")
    fid_fn = frechet_distance_sqrtm if proto.fid_rule == "sqrtm" else frechet_distance
    tf_kwargs = dict(
        isc_splits=isc_splits, prc_neighborhood=prc_neighborhood, kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size, rng_seed=seed, save_cpu_ram=True, prc_batch_size=prc_batch_size,
        verbose=verbose,
    )
    out: dict[str, float] = {}
    name = extractor.metric_name
    if "fid" in metrics:
        out[name("fid")] = fid_fn(*feature_stats(feats["fid"]), *ref_stats)
    if "sfid" in metrics:
        out[name("sfid")] = fid_fn(*feature_stats(feats["sfid"]), *ref_spatial)
    if "is" in metrics:
        logits = torch.as_tensor(feats["isc"])
        if proto.is_rule == "unshuffled-5000":  # ADM: consecutive 5 000-image splits, no permutation
            isc = inception_score_unshuffled(logits, split_size=5000)
        else:  # torch-fidelity / DC-Gen: ``isc_splits`` splits after a RandomState(seed) permutation
            isc = isc_features_to_metric(logits, isc_splits, True, seed)
        out[name("is")] = isc["inception_score_mean"]
        out[name("is_std")] = isc["inception_score_std"]
    if "precision" in metrics or "recall" in metrics:
        pr_ref = torch.as_tensor(pr_features if pr_features is not None else ref["prc"]).float()
        smp = torch.as_tensor(feats["prc"]).float()
        if proto.pr_rule in ("fp16-fallback", "fp32"):
            prc = manifold_precision_recall(pr_ref, smp, k=prc_neighborhood, rule=proto.pr_rule, device=device)
        else:
            prc = prc_features_to_metric(smp, pr_ref, **tf_kwargs)
        for m in ("precision", "recall"):
            if m in metrics:
                out[name(m)] = float(prc[m])
    if "kid" in metrics:
        f1, f2 = torch.as_tensor(feats["kid"]).float(), torch.as_tensor(ref["kid"]).float()
        size = min(kid_subset_size, len(f1), len(f2))  # small evaluations: subsets as large as the sets allow
        kid = kid_features_to_metric(f1, f2, **{**tf_kwargs, "kid_subset_size": size})
        out[name("kid")] = kid["kernel_inception_distance_mean"]
        out[name("kid_std")] = kid["kernel_inception_distance_std"]
    if extractor.prefix == "proxy-" and "held_out_accuracy" in extractor.info:
        out["proxy-classifier_accuracy"] = float(extractor.info["held_out_accuracy"])
    return out
