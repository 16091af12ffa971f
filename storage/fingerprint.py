"""Stable content fingerprints: sha256 over canonical JSON or raw bytes, shortened for use in paths."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["fingerprint", "fingerprint_bytes", "short_id"]


def _canonical(obj: Any) -> Any:
    """Turn dataclasses, tuples, paths and numpy scalars into plain JSON types, deterministically."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()  # numpy / torch scalar
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def fingerprint(obj: Any, length: int = 16) -> str:
    """Hex sha256 of the canonical JSON form of ``obj`` (dicts sorted by key), first ``length`` chars."""
    blob = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def fingerprint_bytes(data: bytes, length: int = 16) -> str:
    """Hex sha256 of raw bytes, first ``length`` chars."""
    return hashlib.sha256(data).hexdigest()[:length]


def short_id(*parts: Any, length: int = 12) -> str:
    """A short deterministic id from several parts (e.g. store_id, run_id)."""
    return fingerprint(list(parts), length=length)
