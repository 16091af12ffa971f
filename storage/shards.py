"""Pack raw images into webdataset tar shards with a Parquet index, and read them back by index range."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from .fingerprint import fingerprint, fingerprint_bytes
from .images import MAX_PIXELS, BadImageError, center_crop, decode_image, to_tensor
from .urls import join, put_atomic, url_to_fs

__all__ = ["DatasetInfo", "ImageDataset", "ImageTorchDataset", "pack_image_folder", "open_dataset",
           "sanitize_key", "IMAGE_EXTS", "LABEL_CONVENTION"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LABEL_CONVENTION = "sorted class-folder names -> 0..K-1 (torchvision ImageFolder / ADM / DiT)"
FORMAT_VERSION = 1
_INDEX_COLUMNS = ("key", "label", "shard", "offset", "bytes", "hash", "valid", "reason", "source")


@dataclass
class DatasetInfo:
    """What ``dataset.json`` holds: a packed dataset's identity and layout."""

    url: str
    name: str
    fingerprint: str
    num_samples: int
    num_valid: int
    num_classes: int
    class_names: list[str]
    shards: list[str]
    label_convention: str = LABEL_CONVENTION
    order: dict = field(default_factory=dict)
    source_fingerprint: str = ""
    format_version: int = FORMAT_VERSION


def sanitize_key(name: str) -> str:
    """A webdataset key from any path: letters, digits, ``_`` and ``-`` only (no dots, slashes or ``..``)."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return key or "item"


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class _Item:
    source: str  # path relative to the source root (tar members: "<tar>::<member key>")
    stem: str  # what the packed key is made from (source without extension)
    label: int
    ext: str
    size: int
    read: Any  # () -> bytes


def _list_folder(fs: Any, root: str) -> tuple[list[_Item], list[str]]:
    entries = fs.find(root, detail=True)
    classes: dict[str, list[tuple[str, int]]] = {}
    for path, info in entries.items():
        if info.get("type") == "directory":
            continue
        prefix = root.rstrip("/") + "/"
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        parts = rel.split("/")
        ext = parts[-1].rsplit(".", 1)[-1].lower() if "." in parts[-1] else ""
        if len(parts) < 2 or ext not in IMAGE_EXTS:
            continue  # top-level files and non-image names (README, .DS_Store) are not samples
        classes.setdefault(parts[0], []).append((rel, int(info.get("size") or 0)))
    if not classes:
        raise ValueError(f"no images found under {root!r}: expected <root>/<class>/<name>.{{{','.join(IMAGE_EXTS)}}} "
                         "or webdataset .tar files")
    names = sorted(classes)
    items = []
    for label, cls in enumerate(names):
        for rel, size in sorted(classes[cls]):
            path = join(root, rel)
            items.append(_Item(source=rel, stem=rel.rsplit(".", 1)[0], label=label,
                               ext=rel.rsplit(".", 1)[-1].lower(), size=size, read=lambda p=path: fs.cat_file(p)))
    return items, names


def _list_tars(fs: Any, root: str, tars: list[str]) -> tuple[list[_Item], list[str]]:
    """Read webdataset tars (``<key>.<img ext>`` + ``<key>.cls``); member names are only used as keys."""
    grouped: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    for tar_path in tars:
        tar_name = tar_path.rstrip("/").rsplit("/", 1)[-1]
        with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")  # webdataset: the key ends at the first dot
                if not ext:
                    continue
                key = f"{tar_name}::{dirname + '/' if dirname else ''}{stem}"
                if key not in grouped:
                    grouped[key] = {}
                    order.append(key)
                grouped[key][ext.lower()] = tf.extractfile(member).read()
    items, labels = [], set()
    for key in order:
        parts = grouped[key]
        if "cls" not in parts:
            continue
        try:
            label = int(parts["cls"].decode().strip())
        except ValueError:
            raise ValueError(f"{key}: .cls must hold an integer label, got {parts['cls'][:20]!r}") from None
        img_ext = next((e for e in parts if e in IMAGE_EXTS), None)
        if img_ext is None:
            continue
        data = parts[img_ext]
        labels.add(label)
        stem = key.replace(".tar::", "__")
        items.append(_Item(source=f"{key}.{img_ext}", stem=stem, label=label, ext=img_ext, size=len(data),
                           read=lambda d=data: d))
    if not items:
        raise ValueError(f"no (<key>.<image>, <key>.cls) pairs found in the tars under {root!r}")
    names = [str(i) for i in range(max(labels) + 1)]
    return items, names


# ------------------------------------------------------------------------------------------------ packing
class _TarWriter:
    """Rolls tar shards at ``shard_bytes``; records each member's data offset for random access."""

    def __init__(self, fs: Any, root: str, shard_bytes: int) -> None:
        self.fs, self.root, self.shard_bytes = fs, root, shard_bytes
        self.names: list[str] = []
        self.file = self.tar = None
        self.size = 0

    def _open(self) -> None:
        name = f"shard-{len(self.names):06d}.tar"
        self.names.append(name)
        self.file = self.fs.open(join(self.root, name), "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.size = 0

    def _member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # deterministic bytes
        self.tar.addfile(info, io.BytesIO(data))  # copies `info`, so derive the offset from the tar position
        self.size += len(data) + 1024
        return self.tar.offset - (-(-len(data) // tarfile.BLOCKSIZE)) * tarfile.BLOCKSIZE

    def add(self, key: str, ext: str, data: bytes, label: int) -> tuple[int, int]:
        if self.tar is None or self.size >= self.shard_bytes:
            self.close()
            self._open()
        offset = self._member(f"{key}.{ext}", data)
        self._member(f"{key}.cls", str(label).encode())
        return len(self.names) - 1, offset

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.tar = self.file = None


def pack_image_folder(
    src_url: str,
    dst_url: str,
    *,
    shard_bytes: int = 1 << 30,
    name: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    max_pixels: int = MAX_PIXELS,
    storage_options: dict | None = None,
    src_storage_options: dict | None = None,
    progress: bool = True,
) -> DatasetInfo:
    """Pack a class-folder tree (``<src>/<class>/<img>``) or a folder of webdataset tars into webdataset shards.

    Writes ``shard-XXXXXX.tar`` (``<key>.<ext>`` + ``<key>.cls``), ``index.parquet`` (one row per input: key,
    label, shard, offset, bytes, hash, valid, reason, source) and ``dataset.json`` last (the completion marker).
    Every input is decoded once: unreadable ones are kept in the index with ``valid=False`` and the reason, and
    not written to the shards. Labels follow sorted class-folder names. With ``shuffle`` the sample order is a
    seeded permutation, so latent-store units (consecutive rows) mix classes. A rerun over an unchanged source
    returns the existing dataset.

    Raises:
        ValueError: no images under ``src_url`` or bad arguments.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    sfs, sroot = url_to_fs(src_url, src_storage_options)
    dfs, droot = url_to_fs(dst_url, storage_options)
    if not sfs.isdir(sroot):
        raise ValueError(f"source {src_url!r} is not a directory")
    tars = sorted(p for p in sfs.ls(sroot, detail=False) if p.endswith(".tar"))
    items, class_names = _list_tars(sfs, sroot, tars) if tars else _list_folder(sfs, sroot)
    source_fp = fingerprint([(i.source, i.label, i.size) for i in items] + [shuffle, seed, max_pixels])
    name = name or sroot.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    meta_path = join(droot, "dataset.json")
    if dfs.exists(meta_path):
        old = json.loads(dfs.cat_file(meta_path))
        if old.get("source_fingerprint") == source_fp:
            return DatasetInfo(**{**old, "url": dst_url})
    order = np.random.default_rng(seed).permutation(len(items)) if shuffle else np.arange(len(items))
    dfs.makedirs(droot, exist_ok=True)
    writer = _TarWriter(dfs, droot, shard_bytes)
    rows: dict[str, list] = {c: [] for c in _INDEX_COLUMNS}
    seen: set[str] = set()
    try:
        for i in tqdm(order.tolist(), desc=f"pack {name}", disable=not progress, unit="img"):
            item = items[i]
            key = sanitize_key(item.stem)
            base, k = key, 1
            while key in seen:
                key, k = f"{base}-{k}", k + 1
            seen.add(key)
            data = item.read()
            try:
                decode_image(data, max_pixels=max_pixels)
                shard, offset = writer.add(key, item.ext, data, item.label)
                valid, reason = True, ""
            except BadImageError as exc:
                shard, offset, valid, reason = -1, -1, False, exc.reason
            for col, val in zip(_INDEX_COLUMNS, (key, item.label, shard, offset, len(data),
                                                 fingerprint_bytes(data), valid, reason, item.source)):
                rows[col].append(val)
    finally:
        writer.close()
    table = pa.table({
        "key": pa.array(rows["key"], pa.string()), "label": pa.array(rows["label"], pa.int64()),
        "shard": pa.array(rows["shard"], pa.int32()), "offset": pa.array(rows["offset"], pa.int64()),
        "bytes": pa.array(rows["bytes"], pa.int64()), "hash": pa.array(rows["hash"], pa.string()),
        "valid": pa.array(rows["valid"], pa.bool_()), "reason": pa.array(rows["reason"], pa.string()),
        "source": pa.array(rows["source"], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put_atomic(dfs, join(droot, "index.parquet"), buf.getvalue())
    # The fingerprint is over content and order (not shard layout): what the latents depend on.
    fp = fingerprint([rows["key"], rows["label"], rows["hash"], rows["valid"], LABEL_CONVENTION])
    info = DatasetInfo(url=dst_url, name=name, fingerprint=fp, num_samples=len(items),
                       num_valid=int(sum(rows["valid"])), num_classes=len(class_names), class_names=class_names,
                       shards=writer.names, order={"shuffled": bool(shuffle), "seed": int(seed)},
                       source_fingerprint=source_fp)
    put_atomic(dfs, meta_path, json.dumps(asdict(info), indent=1).encode())
    return info


# ------------------------------------------------------------------------------------------------ reading
class ImageDataset:
    """A packed dataset opened for reading: index in memory, shards read by byte range (one GET per shard span).

    Picklable and fork-safe: the filesystem is re-created in each process on first use.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        import pyarrow.parquet as pq

        self.url = url
        self.storage_options = storage_options
        fs, root = url_to_fs(url, storage_options)
        try:
            meta = json.loads(fs.cat_file(join(root, "dataset.json")))
        except FileNotFoundError:
            raise FileNotFoundError(f"no packed dataset at {url!r} (dataset.json missing: run "
                                    "storage.shards.pack_image_folder first, or it was interrupted)") from None
        self.info = DatasetInfo(**{**meta, "url": url})
        with fs.open(join(root, "index.parquet"), "rb") as f:
            table = pq.read_table(f)
        self.index = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        self._root = root
        self._fs: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": -1}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, _ = url_to_fs(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    fingerprint = property(lambda self: self.info.fingerprint)
    num_samples = property(lambda self: self.info.num_samples)
    num_classes = property(lambda self: self.info.num_classes)
    class_names = property(lambda self: list(self.info.class_names))
    labels = property(lambda self: self.index["label"].astype(np.int64))
    valid = property(lambda self: self.index["valid"].astype(bool))

    def __len__(self) -> int:
        return self.num_samples

    def read_bytes(self, start: int, stop: int) -> list[bytes | None]:
        """Raw image bytes of rows ``[start, stop)`` (None for invalid rows); one ranged read per shard."""
        if not 0 <= start <= stop <= self.num_samples:
            raise ValueError(f"need 0 <= start <= stop <= {self.num_samples}, got [{start}, {stop})")
        out: list[bytes | None] = [None] * (stop - start)
        shard = self.index["shard"][start:stop]
        offset = self.index["offset"][start:stop]
        size = self.index["bytes"][start:stop]
        for s in np.unique(shard[shard >= 0]):
            rows = np.flatnonzero(shard == s)
            lo = int(offset[rows].min())
            hi = int((offset[rows] + size[rows]).max())
            blob = self.fs.cat_file(join(self._root, self.info.shards[int(s)]), start=lo, end=hi)
            for r in rows:
                a = int(offset[r]) - lo
                out[r] = blob[a:a + int(size[r])]
        return out

    def read_range(self, start: int, stop: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decoded, centre-cropped images of rows ``[start, stop)``.

        Returns:
            ``(uint8 [n, size, size, 3], labels int64 [n], valid bool [n])``; invalid rows are zeros.
        """
        blobs = self.read_bytes(start, stop)
        images = np.zeros((stop - start, size, size, 3), np.uint8)
        valid = np.zeros(stop - start, bool)
        for i, blob in enumerate(blobs):
            if blob is None:
                continue
            try:
                images[i] = center_crop(decode_image(blob), size)
                valid[i] = True
            except BadImageError:
                pass  # packed as valid but unreadable now: report invalid rather than crash the encode
        return images, self.labels[start:stop], valid

    def iter_ranges(self, batch: int) -> Iterator[tuple[int, int]]:
        for a in range(0, self.num_samples, batch):
            yield a, min(a + batch, self.num_samples)

    def torch_dataset(self, size: int, *, hflip: bool = False) -> "ImageTorchDataset":
        """A map-style torch dataset over the valid rows, yielding ``(float32 [3,size,size] in [-1,1], label)``."""
        return ImageTorchDataset(self, size, hflip=hflip)


class ImageTorchDataset(Dataset):
    """Valid images of a packed dataset for AE training; item ``i`` is the i-th valid row.

    With ``hflip`` each item is mirrored with probability ½ from torch's RNG (seed it per worker for
    reproducibility, e.g. through the DataLoader's ``generator``).
    """

    def __init__(self, data: ImageDataset, size: int, *, hflip: bool = False) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.data, self.size, self.hflip = data, int(size), hflip
        self.rows = np.flatnonzero(data.valid)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        blob = self.data.read_bytes(row, row + 1)[0]
        x = to_tensor(center_crop(decode_image(blob), self.size))
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.data.index["label"][row])


def open_dataset(url: str, storage_options: dict | None = None) -> ImageDataset:
    """Open a dataset written by :func:`pack_image_folder`."""
    return ImageDataset(url, storage_options)
