"""Small helpers shared by the metrics modules: JSON / npz objects at fsspec URLs, written with the project's one
atomic write (``storage.urls.write_atomic``)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from storage.urls import exists, join, read_bytes, url_to_fs, write_atomic

__all__ = ["exists", "join", "url_to_fs", "write_atomic", "write_json_atomic", "read_json", "write_npz", "read_npz"]


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    """Read a JSON object."""
    return json.loads(read_bytes(url, storage_options))


def write_npz(url: str, storage_options: dict | None = None, **arrays: np.ndarray) -> None:
    """Atomically write arrays as an uncompressed npz."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(url, buf.getvalue(), storage_options)


def read_npz(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Read an npz written by ``write_npz`` (no pickles)."""
    with np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
