"""Fashion-MNIST (Debian's ``dataset-fashion-mnist`` idx files) as a class-folder tree of 32 px RGB PNGs.

The pipeline packs class-folder trees (``storage.packing.pack_image_folder``), so the idx files are written out as
``<dst>/<k>-<class>/<index>.png``: 28 px grey images zero-padded by 2 px to 32 px (the paper-scale AEs want a
power-of-two side) and repeated over 3 channels (the pipeline's images are RGB).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_DIR", "INSTALL_HINT", "CLASSES", "read_idx", "load_fashion_mnist", "write_class_folders"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist (as root; it puts the idx files under " + DEFAULT_DIR + ")"
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """One idx file (optionally gzipped): magic ``00 00 <dtype> <ndim>``, ndim big-endian int32 sizes, data."""
    p = Path(path)
    raw = (gzip.open if p.suffix == ".gz" else open)(p, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{p} is not an idx file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{p}: header says {dims} ({int(np.prod(dims))} values), file holds {data.size}")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}: install it with {INSTALL_HINT}")


def load_fashion_mnist(folder: str | Path = DEFAULT_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,28,28], labels [N]) of ``split`` ("train" or "t10k")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {folder}: install it with {INSTALL_HINT}")
    images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(f"Fashion-MNIST {split} in {folder}: images {images.shape} and labels {labels.shape} "
                         "do not match")
    return images, labels


def write_class_folders(dst: str | Path, *, per_class: int, folder: str | Path = DEFAULT_DIR, size: int = 32,
                        split: str = "train") -> dict:
    """The first ``per_class`` images of every class as ``<dst>/<k>-<name>/<index>.png`` (RGB, padded to ``size``).

    Deterministic (file order of the idx set); rewrites nothing that exists, so a rerun is cheap.
    """
    from PIL import Image

    images, labels = load_fashion_mnist(folder, split)
    h, w = images.shape[1:]
    if size < max(h, w):
        raise ValueError(f"size {size} is smaller than the {h}x{w} images")
    top, left = (size - h) // 2, (size - w) // 2
    dst = Path(dst)
    counts = {}
    for k in range(int(labels.max()) + 1):
        name = CLASSES[k] if k < len(CLASSES) else f"class{k}"
        out = dst / f"{k}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(labels == k)[:per_class]
        for i in idx:
            f = out / f"{int(i):05d}.png"
            if not f.exists():
                canvas = np.zeros((size, size), np.uint8)
                canvas[top:top + h, left:left + w] = images[i]
                Image.fromarray(np.repeat(canvas[:, :, None], 3, axis=2)).save(f)
        counts[out.name] = int(len(idx))
    return {"source": str(folder), "split": split, "per_class": counts, "size": size}
