"""Small helpers shared by the metrics modules: atomic JSON / npz / bytes objects at fsspec URLs."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from storage.urls import exists, join, put_atomic, read_bytes, url_to_fs

__all__ = ["exists", "join", "url_to_fs", "write_bytes_atomic", "write_json_atomic", "read_json", "write_npz", "read_npz"]


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` so that readers see the whole object or nothing (rename locally; one PUT on object stores)."""
    fs, path = url_to_fs(url, storage_options)
    if "/" in path.strip("/"):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    put_atomic(fs, path, data)


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    """Read a JSON object."""
    return json.loads(read_bytes(url, storage_options))


def write_npz(url: str, storage_options: dict | None = None, **arrays: np.ndarray) -> None:
    """Atomically write arrays as an uncompressed npz."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def read_npz(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Read an npz written by ``write_npz`` (no pickles)."""
    with np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
