"""Image inputs for the metrics: every source becomes a torch Dataset of uint8 [3,H,W] tensors.

Sources: a uint8 array/tensor ``[N,H,W,3]`` (or ``[N,3,H,W]``), a sample store (``storage.sample_store``), an ADM
``.npz`` batch (``arr_0``, ``dcae15.metrics.adm``), a packed dataset (``storage.shards``: ``dataset.json`` + ``index.parquet``), or any image folder / class-folder tree
at an fsspec URL. Folder and packed-dataset images are centre-cropped (ADM/DiT crop) to ``resolution`` when given.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dcae15.metrics._io import url_to_fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImages",
    "FolderImages",
    "NpzImages",
    "PackedImages",
    "SampleStoreImages",
    "as_image_dataset",
    "detect_kind",
    "dataset_fingerprint",
    "default_cache_url",
    "list_class_folder",
    "load_labelled_images",
    "read_npz_array",
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


def _open_zip(url: str, storage_options: dict | None):
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"ADM npz {url} does not exist")
    f = fs.open(path, "rb")
    try:
        return f, zipfile.ZipFile(f, "r")
    except zipfile.BadZipFile as err:
        f.close()
        raise ValueError(f"{url} is not an npz file (zip archive): {err}") from err


def _member_header(zf: zipfile.ZipFile, name: str, url: str):
    if f"{name}.npy" not in zf.namelist():
        raise ValueError(f"{url} has no {name!r} (holds {sorted(n[:-4] for n in zf.namelist())}): an ADM batch "
                         "has arr_0 uint8 [N,H,W,3]")
    member = zf.open(f"{name}.npy")
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(member)
    if fortran or dtype.hasobject:
        member.close()
        raise ValueError(f"{url}:{name} is Fortran-ordered or holds objects: not an ADM batch")
    return member, tuple(shape), dtype


def read_npz_array(url: str, name: str, storage_options: dict | None = None) -> np.ndarray:
    """One small array of an npz (labels, statistics), loaded whole without pickles."""
    f, zf = _open_zip(url, storage_options)
    with f, zf:
        member, shape, dtype = _member_header(zf, name, url)
        with member:
            data = member.read()
    arr = np.frombuffer(data, dtype=dtype)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{url}:{name} is truncated ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape).copy()


class NpzImages(Dataset):
    """The images (``arr_0``) of an ADM npz as uint8 ``[3,H,W]`` tensors, streamed in blocks (never all in memory).

    Sequential reads (what feature extraction does) read each byte once; going backwards reopens the member.
    """

    def __init__(self, url: str, *, block: int = 256, storage_options: dict | None = None):
        self.url, self.block, self.storage_options = str(url), int(block), storage_options
        f, zf = _open_zip(self.url, storage_options)
        with f, zf:
            member, self.shape, dtype = _member_header(zf, "arr_0", self.url)
            member.close()
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(f"{url}: arr_0 must be uint8 [N,H,W,3] (ADM layout), got {dtype} {self.shape}")
        self._reader: tuple[Any, Any, Any] | None = None
        self._pos = 0  # next image the open member would return
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getstate__(self) -> dict:  # DataLoader workers reopen the file
        return {**self.__dict__, "_reader": None, "_pos": 0, "_cache": None}

    def _read_block(self, start: int) -> np.ndarray:
        if self._reader is None or self._pos > start:
            self.close()
            f, zf = _open_zip(self.url, self.storage_options)
            member, _, _ = _member_header(zf, "arr_0", self.url)
            self._reader, self._pos = (f, zf, member), 0
        member, per = self._reader[2], int(np.prod(self.shape[1:]))
        while self._pos < start:  # skip forward (rare: a reader that jumps)
            n = min(self.block, start - self._pos)
            member.read(n * per)
            self._pos += n
        n = min(self.block, len(self) - start)
        data = member.read(n * per)
        if len(data) != n * per:
            raise ValueError(f"{self.url}: arr_0 is truncated at image {start + len(data) // per} of {len(self)}")
        self._pos += n
        return np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        start = i - i % self.block
        if self._cache is None or self._cache[0] != start:
            self._cache = (start, self._read_block(start))
        return torch.from_numpy(self._cache[1][i - start].copy()).permute(2, 0, 1).contiguous()

    def close(self) -> None:
        if self._reader is not None:
            for h in reversed(self._reader):
                h.close()
            self._reader = None


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
