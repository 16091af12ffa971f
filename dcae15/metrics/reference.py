"""Reference statistics of the real data, computed once per (dataset, resolution, feature extractor) and cached.

A reference lives at ``<cache>/reference/<extractor label>-<R>px-<key>/`` where ``key`` hashes every input (dataset
fingerprint, resolution, crop, extractor fingerprint and layer, sample cap, feature-subset size, seed). It holds
``stats.npz`` (``mu``, ``sigma`` over all used images; ``mu_s``, ``sigma_s``: the same for ADM's sFID features when
the extractor has them (Inception); ``features``: a fixed-seed subset of per-image features for precision/recall/KID;
``indices``) and ``attrs.json``, written last: present means complete. Extraction runs in
blocks, each saved as ``parts/part-XXXXX.npz`` (sums, outer-product sums, subset features), so a killed job
resumes at the first missing block. A changed input gives a different key, hence a fresh computation; an unchanged
one is loaded and never recomputed.

Decoding is the cost at ImageNet size (1.28 M JPEGs, ~2 h on one core): images are decoded by DataLoader worker
processes (``num_workers``; spawned, so they also work inside a Prefect worker that forbids forking), in batches
aligned to the packed dataset's read blocks so that no block is decoded twice. Only features are kept, one block at
a time; the images of a batch are dropped once the network has seen them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dcae15.metrics import _io
from dcae15.metrics.extractor import INCEPTION_NAME, INCEPTION_NETWORKS, FeatureExtractorSpec
from dcae15.metrics.inputs import as_image_dataset, dataset_fingerprint, default_cache_url
from dcae15.parallel import default_device
from storage.fingerprint import short_id
from storage.forksafe import in_worker
from storage.lease import claim
from storage.images import CENTER_CROP

__all__ = [
    "FORMAT_VERSION",
    "ReferenceConfig",
    "ReferenceMismatchError",
    "ReferenceStats",
    "get_reference",
    "load_reference",
    "reference_stats",
    "reference_url",
    "default_workers",
]

FORMAT_VERSION = 2  # 2: + mu_s / sigma_s (sFID)
CROP = CENTER_CROP  # ADM/DiT centre crop (storage.images.center_crop), the same preprocessing as training


class ReferenceMismatchError(ValueError):
    """Reference statistics were made with another feature extractor than the one evaluating now."""


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """How a reference is computed (every field is part of its cache key).

    Attributes:
        resolution: centre-crop size of the real images (the generator's output size).
        max_samples: cap on images used for mu/sigma (a fixed-seed random subset); None = the whole split.
        num_features: per-image features kept for precision/recall/KID (fixed-seed subset; ADM keeps 10k).
        seed: seed of both subsets.
        block_size: images per resumable part (not in the key: it does not change the result).
    """

    resolution: int
    max_samples: int | None = None
    num_features: int = 10_000
    seed: int = 0
    block_size: int = 20_000

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(f"ReferenceConfig.resolution must be an int >= 8, got {self.resolution!r}")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"ReferenceConfig.max_samples must be None or >= 2, got {self.max_samples}")
        if self.num_features < 2 or self.block_size < 2:
            raise ValueError(f"num_features and block_size must be >= 2, got {self.num_features}, {self.block_size}")

    def key_fields(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "max_samples": self.max_samples, "num_features": self.num_features,
                "seed": self.seed, "crop": CROP, "format": FORMAT_VERSION}


@dataclasses.dataclass
class ReferenceStats:
    """Loaded reference: Gaussian statistics of all used images plus a feature subset for precision/recall."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    attrs: dict
    url: str | None = None
    indices: np.ndarray | None = None  # dataset rows of ``features``
    mu_s: np.ndarray | None = None  # sFID statistics (ADM's spatial features), None when the extractor has none
    sigma_s: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """``train-split`` (computed here from the dataset) or ``adm`` (an ADM reference batch npz)."""
        return str(self.attrs.get("kind", "train-split"))

    def describe(self) -> str:
        """What the results table records in its ``reference`` column: the kind and where it came from."""
        where = self.attrs.get("source_url") or self.attrs.get("dataset_url") or self.url or "?"
        return f"{self.kind}:{where}"

    def check_extractor(self, extractor: FeatureExtractorSpec) -> None:
        """Refuse to compare features from different networks (names both fingerprints)."""
        if self.kind == "adm":  # its mu/sigma come from ADM's TF Inception graph, which only the Inception port matches
            ok = extractor.name == INCEPTION_NAME or (extractor.name in INCEPTION_NETWORKS
                                                      and not self.attrs.get("statistics_from_file", True))
            if not ok or self.attrs.get("extractor_fingerprint") != extractor.fingerprint:
                raise ReferenceMismatchError(
                    f"ADM reference batch {self.attrs.get('source_url')} holds statistics of the TF InceptionV3 and "
                    f"features of extractor {self.attrs.get('extractor_fingerprint')}, but this evaluation uses "
                    f"{extractor.label} (fingerprint {extractor.fingerprint}): ADM references need the standard "
                    "Inception (evaluate.extractor: inception)")
            return
        mine = (self.attrs.get("extractor_fingerprint"), self.attrs.get("layer"))
        theirs = (extractor.fingerprint, extractor.layers["fid"])
        if mine != theirs:
            raise ReferenceMismatchError(
                f"reference {self.url or ''} was computed with extractor {self.attrs.get('extractor_label')} "
                f"(fingerprint {mine[0]}, layer {mine[1]}) but this evaluation uses {extractor.label} "
                f"(fingerprint {theirs[0]}, layer {theirs[1]}): compute a reference for this extractor"
            )
        if extractor.layers["prc"] != extractor.layers["fid"] or extractor.layers["kid"] != extractor.layers["fid"]:
            raise ValueError(f"{extractor.label}: cached references need one layer for fid, prc and kid")


def _key(dataset_fp: str, extractor: FeatureExtractorSpec, cfg: ReferenceConfig) -> str:
    return short_id(dataset_fp, extractor.fingerprint, extractor.layers["fid"], cfg.key_fields())


def reference_url(
    dataset_url: str, extractor: FeatureExtractorSpec, cfg: ReferenceConfig, *, cache_url: str | None = None,
    dataset_fp: str | None = None, storage_options: dict | None = None,
) -> str:
    """The URL of the reference for these inputs (whether or not it exists yet)."""
    fp = dataset_fp or dataset_fingerprint(dataset_url, storage_options)
    base = cache_url or default_cache_url(dataset_url, storage_options)
    return _io.join(base, "reference", f"{extractor.label}-{cfg.resolution}px-{_key(fp, extractor, cfg)}")


def load_reference(url: str, storage_options: dict | None = None) -> ReferenceStats:
    """Load a complete reference (``attrs.json`` present); raises FileNotFoundError naming the URL otherwise."""
    if not _io.exists(_io.join(url, "attrs.json"), storage_options):
        raise FileNotFoundError(f"no complete reference statistics at {url} (attrs.json missing): compute them first")
    attrs = _io.read_json(_io.join(url, "attrs.json"), storage_options)
    z = _io.read_npz(_io.join(url, "stats.npz"), storage_options)
    return ReferenceStats(mu=z["mu"], sigma=z["sigma"], features=z["features"], attrs=attrs, url=url,
                          indices=z.get("indices"), mu_s=z.get("mu_s"), sigma_s=z.get("sigma_s"))


def _subset(n: int, k: int | None, seed: int, salt: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, size=k, replace=False))


def _load_batches(ds: Dataset, rows: np.ndarray, batch_size: int) -> list[list[int]]:
    """Dataset indices in loader batches: never across a packed dataset's read block (one worker decodes a block
    once), else ``batch_size`` consecutive indices."""
    block, where = getattr(ds, "block", None), getattr(ds, "rows", None)
    key = np.asarray(where)[rows] // int(block) if block and where is not None else np.arange(len(rows)) // batch_size
    cuts = np.flatnonzero(np.diff(key)) + 1
    return [g.tolist() for g in np.split(rows, cuts) if len(g)]


def _worker_init(_: int) -> None:
    in_worker()  # forked workers of a process with Prefect loaded must not die at exit (storage/forksafe.py)
    torch.set_num_threads(1)  # each worker decodes on its own core


def default_workers(num_images: int) -> int:
    """Decode workers when not given: one per core up to 8 (one core left for the network), none for small jobs
    (spawning a worker costs seconds)."""
    return 0 if num_images < 4096 else max(0, min(8, (os.cpu_count() or 1) - 1))


def _block_features(ds: Dataset, rows: np.ndarray, extractor: FeatureExtractorSpec, net, batch_size: int,
                    device: torch.device, num_workers: int, verbose: bool = False,
                    layer: str | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Features [len(rows), D] (float64) of the dataset rows, decoded by ``num_workers`` worker processes; with
    the extractor's sFID layer, the pair (features, spatial features)."""
    loader = DataLoader(ds, batch_sampler=_load_batches(ds, rows, batch_size), num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if num_workers else None,
                        multiprocessing_context="spawn" if num_workers else None)
    layer, out, spatial = extractor.layers["fid"], [], []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            feats = net.convert_features_tuple_to_dict(net(batch.to(device, non_blocking=True)))
            out.append(feats[layer].double().cpu().numpy())
            if extractor.has_sfid:
                spatial.append(feats[extractor.layers["sfid"]].double().cpu().numpy())
            if verbose and i % 50 == 0:
                print(f"  {sum(len(f) for f in out)}/{len(rows)} images")
    return (np.concatenate(out), np.concatenate(spatial)) if extractor.has_sfid else np.concatenate(out)


def reference_stats(
    dataset_url: str,
    resolution: int,
    extractor: FeatureExtractorSpec,
    *,
    cache_url: str | None = None,
    max_samples: int | None = None,
    num_features: int = 10_000,
    seed: int = 0,
    block_size: int = 20_000,
    batch_size: int = 64,
    device: str | None = None,
    num_workers: int | None = None,
    storage_options: dict | None = None,
    verbose: bool = False,
) -> str:
    """Compute (or find) the reference statistics of a dataset's train split; returns their URL.

    Args:
        dataset_url: packed dataset or class-folder tree of the **train** split.
        resolution: centre-crop size (the generated images' size).
        extractor: the feature network (``inception_extractor()`` or the proxy's spec).
        cache_url: where references live; default next to the data (``<dataset>/eval`` or ``<folder>.eval``).
        num_workers: decoding processes; None = ``default_workers`` (one per core up to 8 for large datasets).
    """
    cfg = ReferenceConfig(resolution=resolution, max_samples=max_samples, num_features=num_features, seed=seed,
                          block_size=block_size)
    fp = dataset_fingerprint(dataset_url, storage_options)
    url = reference_url(dataset_url, extractor, cfg, cache_url=cache_url, dataset_fp=fp, storage_options=storage_options)
    if _io.exists(_io.join(url, "attrs.json"), storage_options):
        return url  # complete and keyed by every input: nothing to do
    # one writer: a second evaluation of the same dataset waits here, then finds the statistics (without the claim
    # the first one's cleanup deleted the parts the second was summing)
    with claim(url, what="reference statistics", storage_options=storage_options):
        if not _io.exists(_io.join(url, "attrs.json"), storage_options):
            _compute_reference(url, dataset_url, fp, cfg, extractor, device=device, num_workers=num_workers,
                               batch_size=batch_size, storage_options=storage_options, verbose=verbose)
    return url


def _compute_reference(url: str, dataset_url: str, fp: str, cfg: ReferenceConfig, extractor: FeatureExtractorSpec,
                       *, device: str | None, num_workers: int | None, batch_size: int,
                       storage_options: dict | None, verbose: bool) -> None:
    """The body of :func:`reference_stats` under its claim: features block by block (resumable), then the stats."""
    seed = cfg.seed
    ds = as_image_dataset(dataset_url, resolution=cfg.resolution, storage_options=storage_options)
    used = _subset(len(ds), cfg.max_samples, seed, 0)
    keep = used[_subset(len(used), cfg.num_features, seed, 1)]  # dataset rows whose features are kept
    dev = default_device(device)
    net = extractor.build([extractor.layers[f] for f in ("fid", "sfid") if f in extractor.layers], dev)
    workers = default_workers(len(used)) if num_workers is None else int(num_workers)
    blocks = range(0, len(used), cfg.block_size)
    for b, start in enumerate(blocks):
        part = _io.join(url, "parts", f"part-{b:05d}.npz")
        if _io.exists(part, storage_options):
            continue  # finished before a restart
        rows = used[start:start + cfg.block_size]
        feats = _block_features(ds, rows, extractor, net, batch_size, dev, workers, verbose)
        spatial = {}
        if extractor.has_sfid:
            feats, sp = feats
            spatial = {"sum_s": sp.sum(0), "outer_s": sp.T @ sp}
        kept = np.isin(rows, keep)
        _io.write_npz(part, storage_options, count=np.array(len(rows)), sum=feats.sum(0), outer=feats.T @ feats,
                      rows=rows[kept], features=feats[kept].astype(np.float32), **spatial)
        if verbose:
            print(f"reference {url}: block {b + 1}/{len(blocks)} done")
    n, sums, rows_k, feats_k = 0, {}, [], []
    for b in range(len(blocks)):
        z = _io.read_npz(_io.join(url, "parts", f"part-{b:05d}.npz"), storage_options)
        n += int(z["count"])
        for k in ("sum", "outer", "sum_s", "outer_s"):
            if k in z:
                sums[k] = sums.get(k, 0.0) + z[k]
        rows_k.append(z["rows"])
        feats_k.append(z["features"])
    stats = {}
    for suffix in ("", "_s"):
        if f"sum{suffix}" in sums:
            mu = sums[f"sum{suffix}"] / n
            stats[f"mu{suffix}"] = mu
            stats[f"sigma{suffix}"] = (sums[f"outer{suffix}"] - n * np.outer(mu, mu)) / (n - 1)  # unbiased, as np.cov
    _io.write_npz(_io.join(url, "stats.npz"), storage_options, **stats,
                  features=np.concatenate(feats_k), indices=np.concatenate(rows_k))
    attrs = {
        **cfg.key_fields(), "dataset_url": str(dataset_url), "dataset_fingerprint": fp, "num_samples": n,
        "num_dataset_samples": len(ds), "extractor_name": extractor.name, "extractor_label": extractor.label,
        "extractor_fingerprint": extractor.fingerprint, "layer": extractor.layers["fid"],
        "split_convention": "train split, centre-cropped at the target resolution", "created": time.time(),
        "kind": "train-split", "sfid_layer": extractor.layers.get("sfid"),
    }
    _io.write_json_atomic(_io.join(url, "attrs.json"), attrs, storage_options)  # the completion marker, last
    fs, path = _io.url_to_fs(_io.join(url, "parts"), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # the parts are only a restart aid


def get_reference(dataset_url: str, resolution: int, extractor: FeatureExtractorSpec, **kwargs) -> ReferenceStats:
    """``reference_stats`` then ``load_reference``: the cached statistics, computed on first use."""
    url = reference_stats(dataset_url, resolution, extractor, **kwargs)
    ref = load_reference(url, kwargs.get("storage_options"))
    ref.check_extractor(extractor)
    return ref
