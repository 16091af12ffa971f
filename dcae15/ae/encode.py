"""Encode a packed image dataset into a latent store: create the store once, then pure per-unit encode tasks.

A task (``encode_units``) runs in a Dask worker pinned to one device. What is expensive to set up is done once per
worker process, not per task: the encoder is loaded once per (AE URL, fingerprint, device) and kept (only the
encoder moves to the device; the decoder is dropped), and the dataset index once per (URL, fingerprint). The AE
is fingerprinted once, in the driver (``prepare_store``); workers check the fingerprint ``save_pretrained``
recorded next to the weights. Inside a task, reading + JPEG decoding + cropping of the next batches runs on CPU
threads while the device encodes the current one, and units are written by a writer thread.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch

from dcae15.ae.model import StructuredAutoencoder
from storage.layout import AE_MODEL, Root
from storage.rundir import RunDir
from dcae15.parallel import default_device, place
from dcae15.pixels import from_uint8_nhwc
from storage.images import CENTER_CROP

__all__ = ["CROP", "COMPUTE_DTYPES", "prepare_store", "encode_units", "encode_images", "load_encoder",
           "encoder_loads", "encode_stats", "store_channel_choices", "resolve_dtype", "visible_gpus", "local_device_indices",
           "pin_worker_device"]

#: The preprocessing every store records (storage.images.center_crop: ADM/DiT box-downsample, bicubic, crop).
CROP = CENTER_CROP
#: What the encoder may compute in ("auto": bfloat16 autocast on CUDA or under DCAE15_GPU_BRANCHES=1, else
#: float32). Stored as float16.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


# ------------------------------------------------------------------------------------------------ store attrs
def _training_record(ae_url: str, storage_options: dict | None) -> dict | None:
    """The AE training config next to a model written by ``dcae15.ae.train`` (``<run>/model`` + ``<run>/config.yaml``)."""
    import yaml

    url = str(ae_url).rstrip("/")
    run_url, _, leaf = url.rpartition("/")
    if leaf != AE_MODEL or not run_url:
        return None
    try:
        doc = RunDir(run_url, storage_options).config()
    except (OSError, yaml.YAMLError):
        return None
    return doc.get("config") if isinstance(doc, dict) and isinstance(doc.get("config"), dict) else None


def store_channel_choices(ae: StructuredAutoencoder, ae_url: str, storage_options: dict | None = None) -> list[int]:
    """The c' list a store records for augmented diffusion training: the list the AE was *trained* with.

    An AE trained with ``structured=False`` (or one with no c' list, e.g. DC-AE 1.0) has no channel structure:
    the store then records ``[c]``, so ADT keeps every channel instead of masking a latent that is not ordered.
    A training run's explicit ``channel_choices`` override the preset's list.
    """
    c = ae.latent_channels
    trained = _training_record(ae_url, storage_options)
    if trained is not None:
        if not trained.get("structured", True):
            return [c]
        if trained.get("channel_choices"):
            return sorted({int(v) for v in trained["channel_choices"]})
    return list(ae.channel_choices) if ae.config.structured else [c]


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` elsewhere; others are checked against :data:`COMPUTE_DTYPES`."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {COMPUTE_DTYPES}")
    if dtype != "auto":
        return dtype
    from dcae15.accel import forced_gpu_branches

    return "bfloat16" if str(device).startswith("cuda") or forced_gpu_branches() else "float32"


def _store_attrs(ae: StructuredAutoencoder, ae_fp: str, dataset: Any, ae_url: str, resolution: int, dtype: str,
                 storage_options: dict | None) -> dict[str, Any]:
    return {
        "ae_fingerprint": ae_fp,
        "ae_name": ae.config.name,
        "ae_config": ae.config.to_dict(),
        "ae_scaling_factor": ae.scaling_factor,  # None: the store's measured 1/RMS is used
        "ae_url": ae_url,
        "spatial_compression": ae.spatial_compression,
        "channel_choices": store_channel_choices(ae, ae_url, storage_options),
        "compute_dtype": dtype,
        "dataset_fingerprint": str(dataset.fingerprint),
        "dataset_name": getattr(getattr(dataset, "info", None), "name", None),
        "num_classes": int(dataset.num_classes),
        "resolution": int(resolution),
        "crop": CROP,
    }


def prepare_store(ae_url: str, dataset_url: str, root_url: str, *, resolution: int, flip: bool = True,
                  chunk_size: int | None = None, dtype: str = "auto", device: str = "cpu",
                  ae_fingerprint: str | None = None, storage_options: dict | None = None) -> str:
    """Create (or find) the latent store for (dataset, AE, resolution, crop, flip) at ``<root>/latents/<store_id>``.

    This is where the AE is fingerprinted (once, in the driver). An existing store with the same fingerprints is
    reused as it is (even if it was created from another copy of the AE at another URL); a half-created one is
    completed. The compute dtype (``dtype``, ``auto`` resolved for ``device``) is recorded in the store's attrs
    and every unit of the store is computed in it. ``ae_fingerprint``, when the caller already computed it, is
    checked against the one recorded next to the weights instead of hashing them again.

    Returns:
        The store URL.

    Raises:
        ValueError: ``resolution`` not a multiple of the AE's spatial compression; ``dtype`` unknown, or differing
            from the dtype an existing store was computed in.
    """
    from storage.latent_store import LatentStore, StoreNotFoundError, store_id
    from storage.lease import claim
    from storage.shards import open_dataset

    resolve_dtype(dtype, device)  # validate before any loading
    ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options)
    f = ae.spatial_compression
    if resolution < f or resolution % f:
        raise ValueError(f"resolution={resolution} must be a positive multiple of the AE's compression {f}")
    dataset = open_dataset(dataset_url, storage_options)
    recorded = _recorded_fingerprint(ae_url, storage_options) if ae_fingerprint else None
    ae_fp = ae_fingerprint if ae_fingerprint and recorded in (None, ae_fingerprint) else ae.fingerprint()
    sid = store_id(str(dataset.fingerprint), ae_fp, resolution, CROP, flip)
    url = Root(root_url).latent_store(sid)
    # one creator per store (a no-op when the encode flow holds the store's claim already): Zarr's create of a
    # group two processes create at once fails in one of them (ContainsArrayError)
    with claim(url, what="latent store", storage_options=storage_options):
        try:
            store = LatentStore.open(url, expect_ae=ae_fp, expect_dataset=str(dataset.fingerprint),
                                     expect_resolution=resolution, storage_options=storage_options)
            have = store.attrs.get("compute_dtype", "float32")
            if dtype != "auto" and dtype != have:
                raise ValueError(f"latent store {url} was computed in {have}; encode.dtype={dtype!r} would mix "
                                 f"dtypes within one store. Use dtype='{have}' (or 'auto'), or another root.")
            return url
        except StoreNotFoundError:
            pass
        LatentStore.create(url, num_samples=int(dataset.num_samples), channels=ae.latent_channels,
                           height=resolution // f, width=resolution // f, flip=flip,
                           attrs=_store_attrs(ae, ae_fp, dataset, ae_url, resolution, resolve_dtype(dtype, device),
                                              storage_options),
                           chunk_size=chunk_size, storage_options=storage_options)
    return url


# ------------------------------------------------------------------------------------------------ devices
def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (ids or UUIDs); [] without CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def local_device_indices(worker_hosts: dict[str, str], gpus_per_host: dict[str, int]) -> dict[str, int]:
    """Pin the workers of a running cluster whose processes all see every GPU of their host: the i-th worker of
    a host (by address) gets that host's GPU ``i``.

    Args:
        worker_hosts: worker address -> host.
        gpus_per_host: host -> number of GPUs a worker there sees.

    Raises:
        ValueError: a host runs more workers than it has GPUs (two AE copies would share a device).
    """
    out: dict[str, int] = {}
    by_host: dict[str, list[str]] = collections.defaultdict(list)
    for addr, host in worker_hosts.items():
        by_host[host].append(addr)
    for host, addrs in by_host.items():
        n = gpus_per_host.get(host, 0)
        if len(addrs) > n:
            raise ValueError(f"host {host} runs {len(addrs)} workers but its workers see {n} GPUs: start one worker "
                             "per GPU (`dask cuda worker`, or CUDA_VISIBLE_DEVICES=i per worker)")
        for i, addr in enumerate(sorted(addrs)):
            out[addr] = i
    return out


_PINNED: dict[str, str] = {}


def pin_worker_device(index: int) -> str:
    """Make ``device='cuda'`` mean ``cuda:<index>`` in this (worker) process; returns the device."""
    _PINNED["cuda"] = f"cuda:{int(index)}"
    return _PINNED["cuda"]


def _worker_device(device: str) -> torch.device:
    device = default_device(device).type if device == "auto" else device
    return torch.device(_PINNED.get(device, device))


# ------------------------------------------------------------------------------------------------ per-process caches
_LOCK = threading.Lock()
_ENCODERS: dict[tuple, tuple[torch.nn.Module, str]] = {}
_DATASETS: dict[tuple, Any] = {}
_LOADS = collections.Counter()
_STATS = collections.Counter()


def encoder_loads() -> dict[str, int]:
    """How many times this process loaded an encoder, per AE URL (tests and benchmarks count them)."""
    return dict(_LOADS)


def encode_stats() -> dict[str, float]:
    """Seconds this process spent in ``encode_units``: ``forward_s`` (host->device, forward, latents back),
    ``input_wait_s`` (the device waiting for decoded images: ~0 when decoding keeps ahead), ``write_wait_s``
    (waiting for the writer thread), ``images``."""
    return dict(_STATS)


def _recorded_fingerprint(ae_url: str, storage_options: dict | None) -> str | None:
    from dcae15.ae.model import CONFIG_NAME
    from storage.urls import url_to_fs

    fs, root = url_to_fs(ae_url, storage_options)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{CONFIG_NAME}")).get("_dcae15_fingerprint")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_encoder(ae_url: str, device: torch.device, *, ae_fingerprint: str | None = None,
                 storage_options: dict | None = None) -> tuple[torch.nn.Module, str]:
    """The AE's encoder on ``device``, loaded once per process per (URL, fingerprint, device).

    With ``ae_fingerprint`` (computed once by the driver) the weights are not hashed again: the fingerprint that
    ``save_pretrained`` recorded next to them is compared instead (official checkpoints have none: trusted).
    Without it the AE is hashed here, once per process.

    Returns:
        ``(encoder module in eval mode, AE fingerprint)``.

    Raises:
        StoreMismatchError: the weights at ``ae_url`` record another fingerprint than ``ae_fingerprint``.
    """
    from storage.units import StoreMismatchError

    key = (ae_url, ae_fingerprint, str(device))
    with _LOCK:
        if key in _ENCODERS:
            return _ENCODERS[key]
        if ae_fingerprint is not None:
            recorded = _recorded_fingerprint(ae_url, storage_options)
            if recorded is not None and recorded != ae_fingerprint:
                raise StoreMismatchError(f"autoencoder at {ae_url} has fingerprint {recorded!r}, the encode was "
                                         f"planned with {ae_fingerprint!r}: the weights changed; rerun the encode")
        from dcae15.accel import enable_speed_switches

        enable_speed_switches(device, conv=True)  # TF32 for fp32 encodes; cuDNN autotuning of the conv encoder
        ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options)
        fp = ae_fingerprint or ae.fingerprint()
        encoder = place(ae.net.encoder, device).eval().requires_grad_(False)  # only the encoder goes to the device
        del ae
        _ENCODERS.clear()  # one AE per worker at a time: a new one replaces the old (device memory)
        _ENCODERS[key] = (encoder, fp)
        _LOADS[ae_url] += 1
        return _ENCODERS[key]


def _dataset(url: str, fingerprint: str, storage_options: dict | None):
    """The packed dataset (its index read once per process); refuses a dataset that is not ``fingerprint``."""
    from storage.shards import open_dataset
    from storage.units import StoreMismatchError

    key = (url, fingerprint)
    with _LOCK:
        if key not in _DATASETS:
            ds = open_dataset(url, storage_options)
            if str(ds.fingerprint) != fingerprint:
                raise StoreMismatchError(f"dataset at {url} has fingerprint {ds.fingerprint!r}, the latent store "
                                         f"was created for {fingerprint!r}: encode a new store for this dataset")
            _DATASETS.clear()
            _DATASETS[key] = ds
        return _DATASETS[key]


# ------------------------------------------------------------------------------------------------ compute
def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


@torch.inference_mode()
def encode_images(ae: StructuredAutoencoder | torch.nn.Module, images: np.ndarray, device: torch.device, *,
                  flip: bool = False, dtype: str = "float32") -> np.ndarray:
    """uint8 images [n,H,W,3] -> float32 latents [n,c,h,w] (mirrored first when ``flip``).

    ``ae`` is a StructuredAutoencoder or its bare encoder; ``dtype='bfloat16'`` runs it under bf16 autocast.
    """
    x = from_uint8_nhwc(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    if flip:
        x = x.flip(-1)
    with _autocast(device, dtype):
        z = ae.encode(x) if isinstance(ae, StructuredAutoencoder) else ae(x)
    return z.float().cpu().numpy()


@torch.inference_mode()
def _encode_batch(encoder: torch.nn.Module, images: np.ndarray, device: torch.device, flip: bool, dtype: str
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """One forward for the images and (with ``flip``) their mirrors: uint8 goes to the device (4x fewer bytes than
    float), is scaled there, and comes back as float32 latents."""
    x = torch.from_numpy(images)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = from_uint8_nhwc(x)
    n = x.shape[0]
    if flip:
        x = torch.cat([x, x.flip(-1)])
    with _autocast(device, dtype):
        z = encoder(x)
    z = z.float().cpu().numpy()  # a sync point: the next batch is already decoded by then
    return (z[:n], z[n:]) if flip else (z, None)


def _ahead(fn: Callable[[Any], Any], jobs: list, threads: int, depth: int) -> Iterator[Any]:
    """``map(fn, jobs)`` in order, with up to ``depth`` jobs running ahead on ``threads`` CPU threads."""
    if threads < 1 or depth < 1:
        yield from map(fn, jobs)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        pending: collections.deque[Future] = collections.deque()
        it = iter(jobs)
        for job in it:
            pending.append(pool.submit(fn, job))
            if len(pending) >= depth:
                break
        while pending:
            out = pending.popleft().result()
            job = next(it, None)
            if job is not None:
                pending.append(pool.submit(fn, job))
            yield out


def encode_units(ae_url: str, dataset_url: str, store_url: str, units: list[int], *, batch_size: int = 64,
                 device: str = "cpu", ae_fingerprint: str | None = None, decode_threads: int = 2,
                 prefetch_batches: int = 4, storage_options: dict | None = None, progress: bool = False) -> list[int]:
    """Encode the given units of a latent store (a pure function: a Dask task runs it; it opens everything itself).

    Units that already have their completion marker are skipped; every other unit is encoded (its images, and
    their mirror images when the store keeps flips, in one forward) in the compute dtype the store records, and
    written with its marker last, so a killed task leaves each unit either complete or missing. The encoder and
    the dataset index are loaded once per process (see :func:`load_encoder`). ``decode_threads`` threads read,
    decode and crop up to ``prefetch_batches`` batches ahead of the forward pass.

    Returns:
        The units of ``units`` that are complete now.

    Raises:
        StoreMismatchError: the store was written for another autoencoder or dataset (names both fingerprints).
    """
    from storage.latent_store import LatentStore

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if decode_threads < 0 or prefetch_batches < 0:
        raise ValueError(f"decode_threads and prefetch_batches must be >= 0, got {decode_threads}, {prefetch_batches}")
    dev = _worker_device(device)
    encoder, ae_fp = load_encoder(ae_url, dev, ae_fingerprint=ae_fingerprint, storage_options=storage_options)
    store = LatentStore.open(store_url, expect_ae=ae_fp, storage_options=storage_options)
    attrs = store.attrs
    dataset = _dataset(dataset_url, str(attrs["dataset_fingerprint"]), storage_options)
    resolution, dtype = int(attrs["resolution"]), str(attrs.get("compute_dtype", "float32"))
    todo = [u for u in units if store.unit_marker(u) is None]
    jobs = [(u, a, min(a + batch_size, store.unit_bounds(u)[1]))
            for u in todo for a in range(*store.unit_bounds(u), batch_size)]
    read = lambda job: dataset.read_range(job[1], job[2], resolution)  # noqa: E731  (CPU: GET + decode + crop)
    from tqdm.auto import tqdm

    parts: dict[int, list] = collections.defaultdict(list)
    clock = time.perf_counter
    with ThreadPoolExecutor(1, thread_name_prefix="write") as writer, \
            contextlib.closing(_ahead(read, jobs, decode_threads, prefetch_batches)) as batches:
        writes: collections.deque[Future] = collections.deque()
        for job in tqdm(jobs, desc="encode", disable=not progress):
            t0 = clock()
            images, labels, valid = next(batches)
            t1 = clock()
            unit, _, stop = job
            z, zf = _encode_batch(encoder, images, dev, store.has_flip, dtype)
            _STATS.update(input_wait_s=t1 - t0, forward_s=clock() - t1, images=len(images))
            parts[unit].append((z, zf, np.asarray(labels), np.asarray(valid, dtype=bool)))
            if stop == store.unit_bounds(unit)[1]:  # the unit's last batch: hand it to the writer thread
                got = parts.pop(unit)
                writes.append(writer.submit(
                    store.write_unit, unit, np.concatenate([p[0] for p in got]), np.concatenate([p[2] for p in got]),
                    np.concatenate([p[3] for p in got]),
                    latents_flip=np.concatenate([p[1] for p in got]) if store.has_flip else None))
                t0 = clock()
                while writes and (writes[0].done() or len(writes) > 2):  # at most 2 units in flight; errors surface
                    writes.popleft().result()
                _STATS.update(write_wait_s=clock() - t0)
        for w in writes:
            w.result()
    return list(units)
