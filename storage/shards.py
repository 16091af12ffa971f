"""Packed webdataset shards with a Parquet index, read back by index range (packing: storage.packing)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .images import BadImageError, center_crop, decode_image
# packing lives in storage.packing (no torch import there, so Dask packing workers start light); re-exported here
from .packing import IMAGE_EXTS, LABEL_CONVENTION, DatasetInfo, pack_image_folder, sanitize_key
from .urls import join, url_to_fs

__all__ = ["DatasetInfo", "ImageDataset", "pack_image_folder", "open_dataset",
           "sanitize_key", "IMAGE_EXTS", "LABEL_CONVENTION"]


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


def open_dataset(url: str, storage_options: dict | None = None) -> ImageDataset:
    """Open a dataset written by :func:`pack_image_folder`."""
    return ImageDataset(url, storage_options)
