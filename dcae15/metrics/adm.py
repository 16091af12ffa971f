"""ADM's ``.npz`` evaluation format: export a sample store to it, read ADM sample and reference batches.

The layout is the one of openai/guided-diffusion (``scripts/image_sample.py`` writes it, ``evaluations/
evaluator.py`` reads it), which DiT, fast-DiT, LightningDiT, REPA and DC-Gen all use for their published numbers:

- a sample batch: ``arr_0`` uint8 ``[N, H, W, 3]`` (NHWC, RGB) and, for class-conditional samples, ``arr_1`` int64
  ``[N]`` labels; an uncompressed (stored) zip, so the evaluator streams ``arr_0`` batch by batch;
- a reference batch (``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images (10 000 for ImageNet 256, used for
  precision/recall), ``mu`` / ``sigma`` (pool_3 statistics of the whole train split) and ``mu_s`` / ``sigma_s``
  (the sFID statistics: first 7 channels of ``mixed_6/conv``, 17×17×7 = 2023 numbers per image).

Writing streams one sample-store unit at a time (50 000 images at 256 px are 9.8 GB), so memory stays at one unit.
Loading an ADM reference takes its ``mu``/``sigma``/``mu_s``/``sigma_s`` as they are and computes precision/recall
features of its images with our Inception once, cached next to the file (``<npz>.eval/``) under the extractor's
fingerprint; a batch without statistics gets them computed from its images, as ADM's evaluator does.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from dcae15.metrics import _io
from dcae15.metrics.extractor import INCEPTION_NAME, INCEPTION_NETWORKS, FeatureExtractorSpec
from dcae15.metrics.fidelity import extract_features, feature_stats
from dcae15.metrics.inputs import NpzImages, _open_zip, read_npz_array
from dcae15.metrics.reference import ReferenceMismatchError, ReferenceStats

__all__ = ["NpzImages", "adm_reference", "export_npz", "is_adm_batch", "read_npz_array", "write_adm_npz"]

_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


# ---------------------------------------------------------------- writing

def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header of a C-ordered array (format 1.0, or 2.0 when the header is too long for 1.0)."""
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def write_adm_npz(url: str, images: Iterable[np.ndarray], num_images: int, *, labels: np.ndarray | None = None,
                  extra: dict[str, np.ndarray] | None = None, storage_options: dict | None = None) -> str:
    """Write an ADM-layout npz (``arr_0`` images, ``arr_1`` labels, any ``extra`` arrays) from image blocks.

    Args:
        url: the output file (local path or fsspec URL); appears complete or not at all.
        images: uint8 ``[n, H, W, 3]`` blocks whose lengths sum to ``num_images``.
        labels: int labels ``[num_images]`` (written as ``arr_1``, int64); None for unconditional samples.
        extra: more arrays, e.g. ``mu``/``sigma``/``mu_s``/``sigma_s`` for a reference batch.

    Raises:
        ValueError: a block of another dtype/shape, or a total other than ``num_images``.
    """
    fs, path = _io.url_to_fs(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.partial" if parent else f".{path}.partial"
    try:
        with fs.open(tmp, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            written, shape = 0, None
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                for block in images:
                    block = np.asarray(block)
                    if block.dtype != np.uint8 or block.ndim != 4 or block.shape[-1] != 3:
                        raise ValueError(f"images must be uint8 [n,H,W,3] blocks, got {block.dtype} {block.shape}")
                    if shape is None:
                        shape = block.shape[1:]
                        member.write(_npy_header((int(num_images), *shape), np.uint8))
                    elif block.shape[1:] != shape:
                        raise ValueError(f"image block of shape {block.shape[1:]} after blocks of {shape}")
                    member.write(np.ascontiguousarray(block).tobytes())
                    written += len(block)
            if written != num_images:
                raise ValueError(f"wrote {written} images but the header says {num_images}")
            arrays = dict(extra or {})
            if labels is not None:
                labels = np.asarray(labels, dtype=np.int64)
                if labels.shape != (num_images,):
                    raise ValueError(f"labels must have shape ({num_images},), got {labels.shape}")
                arrays = {"arr_1": labels, **arrays}
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
        fs.mv(tmp, path)  # a rename on local disk; on an object store the upload completed at close
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return url


def export_npz(samples_url: str, out_url: str, *, storage_options: dict | None = None) -> dict[str, Any]:
    """Write a complete sample store as an ADM sample batch (``arr_0`` images, ``arr_1`` labels), unit by unit.

    Returns:
        ``{"url", "num_samples", "resolution", "attrs"}`` (the store's attrs: run, checkpoint, sampler, ...).

    Raises:
        ValueError: the store is incomplete (names the missing units).
    """
    from storage.sample_store import SampleStore

    store = SampleStore.open(samples_url, storage_options=storage_options, read_only=True)
    missing = store.missing_units()
    if missing:
        raise ValueError(f"sample store {samples_url!r} is incomplete ({len(missing)} of {store.num_units} units "
                         f"missing, first {missing[:5]}): rerun sampling before exporting")
    labels = np.concatenate([store.read_unit(u, ["labels"])["labels"] for u in range(store.num_units)])

    def blocks() -> Iterator[np.ndarray]:
        for unit in range(store.num_units):
            yield np.asarray(store.read_unit(unit, ["images"])["images"])

    write_adm_npz(out_url, blocks(), store.num_samples, labels=labels.astype(np.int64),
                  storage_options=storage_options)
    shape = store.array_specs["images"]["tail"]
    return {"url": out_url, "num_samples": int(store.num_samples), "resolution": int(shape[0]), "attrs": store.attrs}


# ---------------------------------------------------------------- reading

def is_adm_batch(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` is an npz file with an ``arr_0`` member (an ADM sample or reference batch)."""
    if not str(url).endswith(".npz"):
        return False
    f, zf = _open_zip(url, storage_options)
    with f, zf:
        return "arr_0.npy" in zf.namelist()


# ---------------------------------------------------------------- reference batches

def _file_id(url: str, storage_options: dict | None) -> str:
    """A cheap identity of a (large) file: name, size and a hash of its first and last MiB."""
    fs, path = _io.url_to_fs(url, storage_options)
    size = int(fs.size(path))
    h = hashlib.sha256(f"{os.path.basename(path)}:{size}".encode())
    with fs.open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def adm_reference(url: str, extractor: FeatureExtractorSpec, *, cache_url: str | None = None, batch_size: int = 64,
                  device: str | None = None, num_features: int | None = None, storage_options: dict | None = None,
                  verbose: bool = False):
    """A ``ReferenceStats`` from an ADM reference batch: its own mu/sigma (+ mu_s/sigma_s), our features of its
    images for precision/recall (computed once, cached at ``<cache_url or npz + '.eval'>/adm-<ids>/``).

    Args:
        url: the ADM reference npz (e.g. ``VIRTUAL_imagenet256_labeled.npz``).
        extractor: ``inception_extractor()``: ADM statistics are TF Inception pool_3 / mixed_6 features, which
            torch-fidelity's port of the same network reproduces; any other network is refused.
        num_features: cap on images used for precision/recall (None: all of them, as ADM's evaluator).

    Raises:
        FileNotFoundError / ValueError: missing file, no ``arr_0``, truncated arrays, statistics of the wrong size.
        ReferenceMismatchError: ``extractor`` is not the Inception network.
    """
    if extractor.name not in INCEPTION_NETWORKS:
        raise ReferenceMismatchError(f"ADM reference batch {url} is in TF-Inception feature space; this evaluation "
                                     f"uses {extractor.label}: set evaluate.extractor: inception")
    images = NpzImages(url, storage_options=storage_options)
    f, zf = _open_zip(url, storage_options)
    with f, zf:
        present = {n[:-4] for n in zf.namelist()}
    # the file's statistics are TF Inception's: another input pipeline (DC-Gen's, for precision/recall) gets
    # statistics of its own features of the images instead
    from_file = extractor.name == INCEPTION_NAME
    stats = {k: read_npz_array(url, k, storage_options) for k in _STAT_KEYS if k in present and from_file}
    for mu, sigma, dim in (("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)):
        if (mu in stats) != (sigma in stats):
            raise ValueError(f"{url} has {mu if mu in stats else sigma} but not {sigma if mu in stats else mu}")
        if mu in stats and (stats[mu].shape != (dim,) or stats[sigma].shape != (dim, dim)):
            raise ValueError(f"{url}: {mu}/{sigma} have shapes {stats[mu].shape}/{stats[sigma].shape}, expected "
                             f"({dim},)/({dim}, {dim}) (ADM's Inception statistics)")
    key = f"adm-{_file_id(url, storage_options)}-{extractor.fingerprint}-{num_features or 'all'}"
    cache = _io.join(cache_url or f"{str(url)}.eval", key)
    if not _io.exists(_io.join(cache, "attrs.json"), storage_options):
        n = len(images) if num_features is None else min(int(num_features), len(images))
        rows = np.arange(n)
        subset = torch.utils.data.Subset(images, rows.tolist()) if n < len(images) else images
        families = ["fid"] + (["sfid"] if "mu_s" not in stats and extractor.has_sfid else [])
        if "mu" in stats:
            families = ["prc"] + families[1:]
        feats = extract_features(subset, extractor, families=families, batch_size=batch_size, device=device,
                                 verbose=verbose)
        computed = {}
        pr = feats.get("prc", feats.get("fid"))
        if "mu" not in stats:
            computed["mu"], computed["sigma"] = feature_stats(feats["fid"])
        if "sfid" in feats:
            computed["mu_s"], computed["sigma_s"] = feature_stats(feats["sfid"])
        _io.write_npz(_io.join(cache, "stats.npz"), storage_options, features=pr.numpy().astype(np.float32),
                      indices=rows, **computed)
        _io.write_json_atomic(_io.join(cache, "attrs.json"), {
            "kind": "adm", "source_url": str(url), "num_images": len(images), "num_features": n,
            "extractor_label": extractor.label, "extractor_fingerprint": extractor.fingerprint,
            "layer": extractor.layers["fid"], "statistics_from": sorted(stats) or "computed from arr_0",
            "computed": sorted(computed), "statistics_from_file": from_file,
            "created": time.time()}, storage_options)  # the completion marker, last
    attrs = _io.read_json(_io.join(cache, "attrs.json"), storage_options)
    z = _io.read_npz(_io.join(cache, "stats.npz"), storage_options)
    merged = {**{k: z[k] for k in _STAT_KEYS if k in z}, **stats}  # the file's own statistics win
    ref = ReferenceStats(mu=merged["mu"], sigma=merged["sigma"], features=z["features"], attrs=attrs, url=cache,
                         indices=z["indices"], mu_s=merged.get("mu_s"), sigma_s=merged.get("sigma_s"))
    ref.check_extractor(extractor)
    return ref
