"""Encode a packed image dataset into a latent store: create the store once, then pure per-unit encode tasks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dcae15.autoencoder import StructuredAutoencoder

__all__ = ["CROP", "prepare_store", "encode_units", "encode_images"]

#: The preprocessing every store records (storage.images.center_crop: ADM/DiT box-downsample, bicubic, crop).
CROP = "adm-center"


def _store_attrs(ae: StructuredAutoencoder, ae_fp: str, dataset: Any, ae_url: str, resolution: int) -> dict[str, Any]:
    return {
        "ae_fingerprint": ae_fp,
        "ae_name": ae.config.name,
        "ae_config": ae.config.to_dict(),
        "ae_scaling_factor": ae.scaling_factor,  # None: the store's measured 1/RMS is used
        "ae_url": ae_url,
        "spatial_compression": ae.spatial_compression,
        "channel_choices": list(ae.channel_choices),
        "dataset_fingerprint": str(dataset.fingerprint),
        "dataset_name": getattr(getattr(dataset, "info", None), "name", None),
        "num_classes": int(dataset.num_classes),
        "resolution": int(resolution),
        "crop": CROP,
    }


def prepare_store(ae_url: str, dataset_url: str, root_url: str, *, resolution: int, flip: bool = True,
                  chunk_size: int | None = None, storage_options: dict | None = None) -> str:
    """Create (or find) the latent store for (dataset, AE, resolution, crop, flip) at ``<root>/latents/<store_id>``.

    An existing store with the same fingerprints is reused as it is (even if it was created from another copy of
    the AE at another URL); a half-created one is completed.

    Returns:
        The store URL.

    Raises:
        ValueError: ``resolution`` not a multiple of the AE's spatial compression.
    """
    from storage.latent_store import LatentStore, StoreNotFoundError, store_id
    from storage.shards import open_dataset
    from storage.urls import join

    ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options)
    f = ae.spatial_compression
    if resolution < f or resolution % f:
        raise ValueError(f"resolution={resolution} must be a positive multiple of the AE's compression {f}")
    dataset = open_dataset(dataset_url, storage_options)
    ae_fp = ae.fingerprint()
    sid = store_id(str(dataset.fingerprint), ae_fp, resolution, CROP, flip)
    url = join(root_url, "latents", sid)
    try:
        LatentStore.open(url, expect_ae=ae_fp, expect_dataset=str(dataset.fingerprint), expect_resolution=resolution,
                         storage_options=storage_options)
        return url
    except StoreNotFoundError:
        pass
    LatentStore.create(url, num_samples=int(dataset.num_samples), channels=ae.latent_channels,
                       height=resolution // f, width=resolution // f, flip=flip,
                       attrs=_store_attrs(ae, ae_fp, dataset, ae_url, resolution), chunk_size=chunk_size,
                       storage_options=storage_options)
    return url


@torch.inference_mode()
def encode_images(ae: StructuredAutoencoder, images: np.ndarray, device: torch.device, *, flip: bool = False
                  ) -> np.ndarray:
    """uint8 images [n,H,W,3] -> float32 latents [n,c,h,w] (mirrored first when ``flip``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if flip:
        x = x.flip(-1)
    return ae.encode(x).float().cpu().numpy()


def encode_units(ae_url: str, dataset_url: str, store_url: str, units: list[int], *, batch_size: int = 64,
                 device: str = "cpu", storage_options: dict | None = None, progress: bool = False) -> list[int]:
    """Encode the given units of a latent store (a pure function: a Dask task runs it; it opens everything itself).

    Units that already have their completion marker are skipped; every other unit is encoded (its images, and
    their mirror images when the store keeps flips) and written with its marker last, so a killed task leaves
    each unit either complete or missing.

    Returns:
        The units of ``units`` that are complete now.

    Raises:
        StoreMismatchError: the store was written for another autoencoder or dataset (names both fingerprints).
    """
    from storage.latent_store import LatentStore
    from storage.shards import open_dataset

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options)
    ae_fp = ae.fingerprint()  # on CPU, before moving: the store must have been written by exactly these weights
    ae = ae.to(dev).eval()
    dataset = open_dataset(dataset_url, storage_options)
    store = LatentStore.open(store_url, expect_ae=ae_fp, expect_dataset=str(dataset.fingerprint),
                             storage_options=storage_options)
    resolution = int(store.attrs["resolution"])
    done = set(store.completed_units())
    from tqdm.auto import tqdm

    for unit in tqdm(units, desc="encode", disable=not progress):
        if unit in done:
            continue
        start, stop = store.unit_bounds(unit)
        lat, lat_flip, labels, valid = [], [], [], []
        for a in range(start, stop, batch_size):
            images, lab, val = dataset.read_range(a, min(a + batch_size, stop), resolution)
            lat.append(encode_images(ae, images, dev))
            if store.has_flip:
                lat_flip.append(encode_images(ae, images, dev, flip=True))
            labels.append(np.asarray(lab)), valid.append(np.asarray(val, dtype=bool))
        store.write_unit(unit, np.concatenate(lat), np.concatenate(labels), np.concatenate(valid),
                         latents_flip=np.concatenate(lat_flip) if store.has_flip else None)
    return list(units)
