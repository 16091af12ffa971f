"""Image inputs for the metrics: every source becomes a torch Dataset of uint8 [3,H,W] tensors.

Sources: a uint8 array/tensor ``[N,H,W,3]`` (or ``[N,3,H,W]``), a sample store (``storage.sample_store``), an ADM
``.npz`` batch (``arr_0``, ``dcae15.metrics.adm``), a packed dataset (``storage.shards``: ``dataset.json`` + ``index.parquet``), or any image folder / class-folder tree
at an fsspec URL. Folder and packed-dataset images are centre-cropped (ADM/DiT crop) to ``resolution`` when given.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dcae15.metrics._io import url_to_fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImages",
    "FolderImages",
    "PackedImages",
    "SampleStoreImages",
    "as_image_dataset",
    "detect_kind",
    "dataset_fingerprint",
    "default_cache_url",
    "list_class_folder",
    "load_labelled_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _crop(pil, resolution: int | None) -> np.ndarray:
    if resolution is None:
        return np.asarray(pil.convert("RGB"), dtype=np.uint8)
    from storage.images import center_crop

    return center_crop(pil.convert("RGB"), resolution)


class ArrayImages(Dataset):
    """Images held in memory: uint8 ``[N,H,W,3]`` (numpy or torch) or torch uint8 ``[N,3,H,W]``."""

    def __init__(self, images: Any):
        arr = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if arr.dtype != torch.uint8 or arr.ndim != 4:
            raise ValueError(f"images must be uint8 [N,H,W,3] or [N,3,H,W], got dtype {arr.dtype} shape {tuple(arr.shape)}")
        if arr.shape[-1] == 3 and arr.shape[1] != 3:
            arr = arr.permute(0, 3, 1, 2)
        elif arr.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got shape {tuple(arr.shape)}")
        if len(arr) == 0:
            raise ValueError("images is empty: need at least one image")
        self.images = arr

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].contiguous()


def list_class_folder(url: str, storage_options: dict | None = None) -> tuple[list[str], list[int], list[str], Any]:
    """List an image folder: (files, labels, class_names, fs). Labels are sorted sub-folder indices (0 when flat)."""
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ValueError(f"image folder {url!r} does not exist or is not a directory")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {url!r}")
    rel = [posixpath.relpath(p, root) for p in files]
    class_names = sorted({r.split("/")[0] for r in rel if "/" in r})
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index[r.split("/")[0]] if "/" in r else 0 for r in rel]
    return files, labels, class_names, fs


class FolderImages(Dataset):
    """All images under an fsspec folder URL (recursive, sorted), RGB, centre-cropped to ``resolution`` if given."""

    def __init__(self, url: str, *, resolution: int | None = None, storage_options: dict | None = None):
        self.files, self.labels, self.class_names, self.fs = list_class_folder(url, storage_options)
        self.resolution = resolution
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with self.fs.open(self.files[i], "rb") as f:
            arr = np.array(_crop(Image.open(io.BytesIO(f.read())), self.resolution))  # writable copy
        if self._shape is None:
            self._shape = arr.shape
        elif arr.shape != self._shape:  # torch-fidelity batches images, so sizes must agree
            raise ValueError(
                f"image {self.files[i]} has shape {arr.shape}, others {self._shape}: pass resolution= to centre-crop"
            )
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class PackedImages(Dataset):
    """Valid images of a packed dataset (``storage.shards.open_dataset``), read in blocks, centre-cropped."""

    def __init__(self, url: str, *, resolution: int, block: int = 256, storage_options: dict | None = None):
        from storage.shards import open_dataset

        if resolution is None or resolution < 8:
            raise ValueError(f"resolution must be an int >= 8 for a packed dataset, got {resolution!r}")
        self.ds = open_dataset(url, storage_options=storage_options)
        self.resolution, self.block = int(resolution), int(block)
        valid = getattr(self.ds, "valid", None)
        self.rows = np.arange(self.ds.num_samples) if valid is None else np.flatnonzero(np.asarray(valid))
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        row = int(self.rows[i])
        start = row - row % self.block
        if self._cache is None or self._cache[0] != start:  # sequential access: one read_range per block
            stop = min(start + self.block, self.ds.num_samples)
            images, _, _ = self.ds.read_range(start, stop, self.resolution)
            self._cache = (start, images)
        return torch.from_numpy(np.ascontiguousarray(self._cache[1][row - start])).permute(2, 0, 1).contiguous()


class SampleStoreImages(Dataset):
    """Images of a complete sample store (``storage.sample_store``), read one unit (Zarr chunk) at a time."""

    def __init__(self, url: str, *, storage_options: dict | None = None):
        from storage.sample_store import SampleStore

        self.store = SampleStore.open(url, storage_options=storage_options, read_only=True)
        missing = self.store.missing_units()
        if missing:
            raise ValueError(f"sample store {url!r} is incomplete ({len(missing)} of {self.store.num_units} units "
                             "missing): rerun sampling to finish it before evaluating")
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.store.num_samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        unit = self.store.unit_of(int(i))
        if self._cache is None or self._cache[0] != unit:  # torch-fidelity reads in order: one GET per unit
            start, stop = self.store.unit_bounds(unit)
            self._cache = (unit, np.asarray(self.store.read_range(start, stop)[0]))
        start, _ = self.store.unit_bounds(unit)
        return torch.from_numpy(np.ascontiguousarray(self._cache[1][int(i) - start])).permute(2, 0, 1).contiguous()


def detect_kind(url: str, storage_options: dict | None = None) -> str:
    """'sample_store' (a Zarr group), 'packed' (dataset.json + index.parquet), 'npz' (an ADM batch) or 'folder'."""
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    if root.endswith(".npz") and fs.isfile(root):
        return "npz"
    if fs.exists(f"{root}/dataset.json") and fs.exists(f"{root}/index.parquet"):
        return "packed"
    if fs.exists(f"{root}/zarr.json"):
        return "sample_store"
    if fs.isdir(root):
        return "folder"
    raise ValueError(f"{url!r} is neither a sample store, a packed dataset nor an image folder")


def as_image_dataset(
    source: Any, *, resolution: int | None = None, storage_options: dict | None = None
) -> Dataset:
    """Wrap any supported image source as a Dataset of uint8 [3,H,W] tensors (see the module docstring)."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ArrayImages(source)
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        url = str(source)
        kind = detect_kind(url, storage_options)
        if kind == "packed":
            return PackedImages(url, resolution=resolution, storage_options=storage_options)
        if kind == "sample_store":
            return SampleStoreImages(url, storage_options=storage_options)
        if kind == "npz":
            from dcae15.metrics.adm import NpzImages

            return NpzImages(url, storage_options=storage_options)
        return FolderImages(url, resolution=resolution, storage_options=storage_options)
    raise ValueError(
        f"unsupported image source {type(source).__name__}: pass a uint8 array/tensor, a torch Dataset, "
        "or the URL of a sample store, packed dataset or image folder"
    )


def dataset_fingerprint(url: str, storage_options: dict | None = None) -> str:
    """The dataset's fingerprint: the packed dataset's own, else a hash of the folder listing (paths + sizes)."""
    from storage.fingerprint import fingerprint

    if detect_kind(url, storage_options) == "packed":
        from storage.shards import open_dataset

        return str(open_dataset(url, storage_options=storage_options).fingerprint)
    files, labels, classes, fs = list_class_folder(url, storage_options)
    _, root = url_to_fs(url, storage_options)
    sizes = [fs.size(p) for p in files]  # listing + sizes: content hashing a whole ImageNet folder is too slow
    return fingerprint({"files": [posixpath.relpath(p, root.rstrip("/")) for p in files], "sizes": sizes})


def load_labelled_images(
    url: str, *, resolution: int | None, storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All valid images of a dataset as (uint8 [N,H,W,3], int64 labels [N], class_names) — for small datasets.

    ``resolution`` None keeps a folder's native size (all images must agree); a packed dataset needs a size.
    """
    if detect_kind(url, storage_options) == "packed":
        from storage.shards import open_dataset

        ds = open_dataset(url, storage_options=storage_options)
        images, labels, valid = ds.read_range(0, ds.num_samples, resolution)
        valid = np.asarray(valid, dtype=bool)
        return np.asarray(images)[valid], np.asarray(labels, dtype=np.int64)[valid], list(ds.class_names)
    folder = FolderImages(url, resolution=resolution, storage_options=storage_options)
    images = np.stack([folder[i].permute(1, 2, 0).numpy() for i in range(len(folder))])
    return images, np.asarray(folder.labels, dtype=np.int64), folder.class_names


def default_cache_url(dataset_url: str, storage_options: dict | None = None) -> str:
    """Where evaluation caches live next to the data: ``<packed dataset>/eval``, or a sibling ``<folder>.eval``
    (never inside a class-folder tree, where a new folder would look like one more class)."""
    if detect_kind(dataset_url, storage_options) == "packed":
        return str(dataset_url).rstrip("/") + "/eval"
    return str(dataset_url).rstrip("/") + ".eval"
