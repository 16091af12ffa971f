"""Unit-granular Zarr v3 stores: pre-sized arrays written one unit (one shard, one writer) at a time, each
unit completed by a marker object written last, so reruns redo exactly the missing units."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .urls import join, mask_options, put_atomic, url_to_fs, zarr_store

__all__ = [
    "ArraySpec",
    "UnitStore",
    "StoreMismatchError",
    "IncompleteStoreError",
    "StoreNotFoundError",
    "CODECS",
    "make_compressors",
]

MARKER_DIR = "_dcae15"  # completion markers live beside the Zarr arrays, never inside a shard object


class StoreMismatchError(ValueError):
    """A store exists but was written for other inputs (autoencoder, dataset, resolution, shapes...)."""


class IncompleteStoreError(RuntimeError):
    """An operation needs every unit written (and sometimes finalize) but some are missing."""


class StoreNotFoundError(FileNotFoundError):
    """No (completely created) store at the URL."""


# Codec name -> (blosc cname or "zstd" or None, level, byte-shuffle). "none" stores raw bytes.
CODECS: dict[str, tuple[str | None, int, bool]] = {
    "none": (None, 0, False),
    "zstd1": ("zstd", 1, False),
    "zstd3": ("zstd", 3, False),
    "blosc-zstd1-shuffle": ("blosc-zstd", 1, True),
    "blosc-lz4-shuffle": ("blosc-lz4", 5, True),
}


def make_compressors(name: str) -> tuple:
    """Zarr v3 compressors for a codec name in :data:`CODECS`.

    Raises:
        ValueError: unknown name (the message lists the allowed ones).
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    if name not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {name!r}")
    kind, level, shuffle = CODECS[name]
    if kind is None:
        return ()
    if kind == "zstd":
        return (ZstdCodec(level=level),)
    return (BloscCodec(cname=kind.split("-", 1)[1], clevel=level, shuffle="shuffle" if shuffle else "noshuffle"),)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a unit store: per-sample shape and dtype; axis 0 is the sample axis.

    Attributes:
        tail: per-sample shape (``()`` for scalars).
        dtype: numpy dtype name.
        codec: a key of :data:`CODECS` (per-sample arrays of a few bytes stay uncompressed).
        inner_chunks: inner Zarr chunks per unit; 1 stores a unit as one plain chunk object, >1 as one shard
            holding that many chunks (random access to part of a unit without reading all of it).
    """

    tail: tuple[int, ...]
    dtype: str
    codec: str = "none"
    inner_chunks: int = 1

    def __post_init__(self) -> None:
        np.dtype(self.dtype)  # raises TypeError on nonsense
        make_compressors(self.codec)
        if self.inner_chunks < 1:
            raise ValueError(f"inner_chunks must be >= 1, got {self.inner_chunks}")

    def as_json(self) -> dict:
        return {"tail": list(self.tail), "dtype": self.dtype, "codec": self.codec, "inner_chunks": self.inner_chunks}


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _json_norm(obj: Any) -> Any:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal to what was stored."""
    from .fingerprint import _canonical

    return json.loads(json.dumps(_canonical(obj), sort_keys=True))


class UnitStore:
    """Base of :class:`~storage.latent_store.LatentStore` and :class:`~storage.sample_store.SampleStore`.

    Layout at ``url``: a Zarr v3 group whose arrays are pre-sized to ``num_samples`` along axis 0 and chunked so
    that one *unit* (``unit_size`` consecutive samples) is one chunk or one shard object per array; plus
    ``_dcae15/created.json`` (written last by :meth:`create`), ``_dcae15/units/<u>.json`` (one per finished unit,
    written last by :meth:`write_unit`), and ``_dcae15/finalized.json`` (subclasses). No object is ever
    read-modify-written by two writers: distinct units touch distinct objects.

    Handles are opened lazily and reopened after a fork or unpickling (Dask tasks, DataLoader workers).
    """

    KIND = "unit-store"
    FORMAT_VERSION = 1

    def __init__(self, url: str, *, storage_options: dict | None = None, read_only: bool = False,
                 _meta: dict | None = None) -> None:
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self._fs, self._path = url_to_fs(self.url, self.storage_options)
        self._meta = _meta if _meta is not None else self._read_created()
        self._group_cache: Any = None
        self._group_pid = -1

    # -------------------------------------------------------------------------------------------- plumbing
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_group_cache"], state["_group_pid"] = None, -1
        state["_fs"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs, self._path = url_to_fs(self.url, self.storage_options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, num_samples={self.num_samples}, units={self.num_units})"

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._path = url_to_fs(self.url, self.storage_options)
        return self._fs

    def _p(self, *parts: str) -> str:
        return join(self._path, *parts)

    @property
    def group(self):
        """The Zarr group, (re)opened in this process on first use."""
        import zarr

        if self._group_cache is None or self._group_pid != os.getpid():
            store = zarr_store(self.url, self.storage_options, read_only=self.read_only)
            self._group_cache = zarr.open_group(store, mode="r" if self.read_only else "r+")
            self._group_pid = os.getpid()
        return self._group_cache

    def _read_created(self) -> dict:
        path = self._p(MARKER_DIR, "created.json")
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise StoreNotFoundError(
                f"no {self.KIND} at {self.url!r} (missing {MARKER_DIR}/created.json: never created, or creation "
                "was interrupted — call create() again)"
            ) from None
        meta = json.loads(raw)
        if meta.get("kind") != self.KIND:
            raise StoreMismatchError(f"{self.url!r} holds a {meta.get('kind')!r}, not a {self.KIND!r}")
        if meta.get("format_version", 0) > self.FORMAT_VERSION:
            raise StoreMismatchError(
                f"{self.url!r} has format_version {meta['format_version']}; this code reads <= {self.FORMAT_VERSION}"
            )
        return meta

    # -------------------------------------------------------------------------------------------- creation
    @classmethod
    def _create(cls, url: str, *, num_samples: int, unit_size: int, arrays: dict[str, ArraySpec], attrs: dict,
                storage_options: dict | None = None, **kw: Any):
        """Create the store, or open it if it already exists with the same layout and attrs."""
        import zarr

        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if unit_size < 1:
            raise ValueError(f"unit_size (chunk_size) must be >= 1, got {unit_size}")
        for name, spec in arrays.items():
            if unit_size % spec.inner_chunks:
                raise ValueError(f"array {name!r}: unit_size {unit_size} is not divisible by inner_chunks "
                                 f"{spec.inner_chunks}")
        meta = _json_norm({
            "kind": cls.KIND,
            "format_version": cls.FORMAT_VERSION,
            "num_samples": int(num_samples),
            "unit_size": int(unit_size),
            "arrays": {k: v.as_json() for k, v in arrays.items()},
            "attrs": attrs,
        })
        fs, path = url_to_fs(url, storage_options)
        created = join(path, MARKER_DIR, "created.json")
        if fs.exists(created):
            old = json.loads(fs.cat_file(created))
            diffs = _diff(old, meta)
            if diffs:
                raise StoreMismatchError(
                    f"a {cls.KIND} already exists at {url!r} with other settings: " + "; ".join(diffs)
                    + ". Use another URL (store ids derive from the inputs) or delete the old store."
                )
            return cls(url, storage_options=storage_options, _meta=old, **kw)
        # Either nothing is there or a create was interrupted: (re)build the group from scratch.
        store = zarr_store(url, storage_options)
        group = zarr.open_group(store, mode="w")
        for name, spec in arrays.items():
            inner = unit_size // spec.inner_chunks
            group.create_array(
                name,
                shape=(num_samples, *spec.tail),
                chunks=(inner, *spec.tail),
                shards=(unit_size, *spec.tail) if spec.inner_chunks > 1 else None,
                dtype=spec.dtype,
                compressors=make_compressors(spec.codec),
                fill_value=0,
            )
        group.attrs.update(_json_norm({**meta["attrs"], "dcae15_kind": cls.KIND, "num_samples": num_samples,
                                       "unit_size": unit_size, "written_by": _version()}))
        put_atomic(fs, created, json.dumps(meta, sort_keys=True).encode())
        return cls(url, storage_options=storage_options, _meta=meta, **kw)

    # -------------------------------------------------------------------------------------------- geometry
    @property
    def num_samples(self) -> int:
        return int(self._meta["num_samples"])

    @property
    def unit_size(self) -> int:
        """Samples per unit (the last unit may be shorter)."""
        return int(self._meta["unit_size"])

    @property
    def num_units(self) -> int:
        return -(-self.num_samples // self.unit_size)

    @property
    def array_specs(self) -> dict[str, dict]:
        return self._meta["arrays"]

    def unit_bounds(self, unit: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` of a unit."""
        if not 0 <= unit < self.num_units:
            raise ValueError(f"unit must be in [0, {self.num_units}), got {unit}")
        start = unit * self.unit_size
        return start, min(start + self.unit_size, self.num_samples)

    def unit_of(self, index: int) -> int:
        return index // self.unit_size

    # -------------------------------------------------------------------------------------------- markers
    def _marker(self, unit: int) -> str:
        return self._p(MARKER_DIR, "units", f"{unit:08d}.json")

    def completed_units(self) -> list[int]:
        """Units whose completion marker exists (one listing call)."""
        try:
            names = self.fs.ls(self._p(MARKER_DIR, "units"), detail=False)
        except FileNotFoundError:
            return []
        done = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json") and base[:-5].isdigit():
                done.append(int(base[:-5]))
        self.fs.invalidate_cache(self._p(MARKER_DIR, "units"))
        return sorted(u for u in done if u < self.num_units)

    def missing_units(self) -> list[int]:
        """Units without a completion marker: the work a rerun still has to do."""
        done = set(self.completed_units())
        return [u for u in range(self.num_units) if u not in done]

    def unit_marker(self, unit: int) -> dict | None:
        """The marker of a finished unit (hashes, summary), or None while it is missing."""
        try:
            return json.loads(self.fs.cat_file(self._marker(unit)))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # -------------------------------------------------------------------------------------------- writing
    def _write_unit_arrays(self, unit: int, arrays: dict[str, np.ndarray], summary: dict | None = None) -> None:
        """Write every array's rows of ``unit`` then the marker (last). Rewriting a unit is allowed."""
        if self.read_only:
            raise PermissionError(f"{self.url!r} was opened read-only")
        start, stop = self.unit_bounds(unit)
        n = stop - start
        specs = self.array_specs
        if set(arrays) != set(specs):
            raise ValueError(f"unit {unit}: expected arrays {sorted(specs)}, got {sorted(arrays)}")
        prepared = {}
        for name, value in arrays.items():
            spec = specs[name]
            value = np.asarray(value)
            want = (n, *spec["tail"])
            if tuple(value.shape) != want:
                raise ValueError(f"unit {unit}: array {name!r} must have shape {want}, got {tuple(value.shape)}")
            prepared[name] = np.ascontiguousarray(value.astype(spec["dtype"], copy=False))
        # The old marker goes first: a crash mid-rewrite must leave the unit missing, never stale-but-marked.
        marker = self._marker(unit)
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
        self._on_unit_write()
        group = self.group
        for name, value in prepared.items():
            group[name][start:stop] = value
        record = {
            "unit": unit, "start": start, "stop": stop,
            "sha256": {name: _sha256(value) for name, value in prepared.items()},
            **(summary or {}),
        }
        put_atomic(self.fs, marker, json.dumps(_json_norm(record)).encode())

    def _on_unit_write(self) -> None:
        """Hook: subclasses drop a finalized marker here."""

    def read_unit(self, unit: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole-unit read of the named arrays (one object per array per unit)."""
        start, stop = self.unit_bounds(unit)
        group = self.group
        return {name: group[name][start:stop] for name in (names or list(self.array_specs))}

    # -------------------------------------------------------------------------------------------- checking
    def verify(self) -> dict:
        """Re-read every finished unit and compare its bytes with the hashes in its marker.

        Returns:
            ``{"ok": bool, "missing": [units], "corrupt": [units], "checked": n}``.
        """
        corrupt, checked = [], 0
        missing = self.missing_units()
        for unit in self.completed_units():
            marker = self.unit_marker(unit)
            if marker is None:
                corrupt.append(unit)
                continue
            data = self.read_unit(unit)
            checked += 1
            if any(_sha256(data[k]) != marker["sha256"].get(k) for k in data):
                corrupt.append(unit)
        return {"ok": not missing and not corrupt, "missing": missing, "corrupt": corrupt, "checked": checked}

    def _consolidate(self) -> None:
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # our marker folder and "consolidated metadata is not in the spec"
            zarr.consolidate_metadata(zarr_store(self.url, self.storage_options))
        self._group_cache = None

    def describe(self) -> str:
        """One line for logs; storage options are masked."""
        return (f"{self.KIND} {self.url} ({self.num_samples} samples, {self.num_units} units of {self.unit_size}; "
                f"options {mask_options(self.storage_options)})")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON dicts (fingerprints shown in full)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: existing {a!r} != requested {b!r}")
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dcae15")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0+unknown"
