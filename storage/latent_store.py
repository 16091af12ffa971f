"""The Zarr v3 latent store: fp16 latents (and flipped-image latents) of a whole dataset, written per unit."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from .fingerprint import short_id
from .units import (
    MARKER_DIR,
    ArraySpec,
    IncompleteStoreError,
    StoreMismatchError,
    StoreNotFoundError,
    UnitStore,
)
from .urls import put_atomic

__all__ = [
    "store_id",
    "LatentStore",
    "StoreMismatchError",
    "IncompleteStoreError",
    "StoreNotFoundError",
    "REQUIRED_ATTRS",
    "DEFAULT_CODEC",
    "DEFAULT_UNIT_BYTES",
]

#: attrs every latent store must carry (what a reuse check compares).
REQUIRED_ATTRS = ("ae_fingerprint", "dataset_fingerprint", "resolution")
#: Measured in bench/RESULTS.md (storage section): fp16 latents barely compress, and raw chunks read/write fastest.
DEFAULT_CODEC = "none"
#: Bytes of latents per unit when chunk_size is not given (DESIGN §3: 8-32 MB per chunk).
DEFAULT_UNIT_BYTES = 16 * 2**20
_FINALIZED = "finalized.json"
#: labels + valid of every row in one uncompressed .npz object, written by finalize() so that a reader gets them
#: with one GET instead of one per unit and array (2 x 1 252 GETs at ImageNet size with 16 MB units).
_ROW_INDEX = "rows.npz"


def store_id(dataset_fp: str, ae_fp: str, resolution: int, crop: str = "adm-center", flip: bool = False) -> str:
    """The deterministic id of the store for (dataset, autoencoder, resolution, crop, flip).

    The same inputs always give the same id, so a second backbone finds and reuses an existing store.
    """
    if not dataset_fp or not ae_fp:
        raise ValueError(f"dataset_fp and ae_fp must be non-empty, got {dataset_fp!r}, {ae_fp!r}")
    if int(resolution) < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    return short_id("latent-store", str(dataset_fp), str(ae_fp), int(resolution), str(crop), bool(flip))


def default_chunk_size(sample_bytes: int, num_samples: int) -> int:
    """A power-of-two number of samples giving about :data:`DEFAULT_UNIT_BYTES` per unit."""
    size = 2 ** max(0, int(math.log2(max(1, DEFAULT_UNIT_BYTES // max(1, sample_bytes)))))
    return max(1, min(size, num_samples))


class LatentStore(UnitStore):
    """Latents of one (dataset, autoencoder, resolution, crop, flip) at ``<root>/latents/<store_id>/``.

    Arrays (axis 0 = dataset index): ``latents`` float16 ``[N, C, h, w]``, optional ``latents_flip`` (latents of
    the horizontally flipped images), ``labels`` int16 ``[N]``, ``valid`` bool ``[N]`` (rows of unreadable
    images are zeros and invalid). One *unit* = ``chunk_size`` samples = one chunk/shard object per array,
    written by exactly one writer (:meth:`write_unit`). The marker of a unit carries its hashes and channel
    sums, so :meth:`finalize` computes channel statistics without re-reading the data and :meth:`verify`
    can check every byte.

    Group attrs: the caller's ``attrs`` (required: ``ae_fingerprint``, ``dataset_fingerprint``,
    ``resolution``; customary: ``ae_name``, ``ae_config``, ``ae_scaling_factor``, ``spatial_compression``,
    ``dataset_name``, ``crop``), plus ``latent_channels``, ``latent_height``, ``latent_width``, ``flip``,
    ``num_samples``, ``unit_size``, ``written_by`` and, after :meth:`finalize`, ``channel_mean``,
    ``channel_std``, ``channel_rms``, ``latent_rms``, ``num_valid``, ``scaling_factor_measured`` (1/RMS) and
    ``scaling_factor`` (the autoencoder's own factor if it has one, else the measured one).
    """

    KIND = "latent-store"

    # ---------------------------------------------------------------------------------------- create/open
    @classmethod
    def create(
        cls,
        url: str,
        *,
        num_samples: int,
        channels: int,
        height: int,
        width: int,
        flip: bool,
        attrs: dict[str, Any],
        chunk_size: int | None = None,
        codec: str = DEFAULT_CODEC,
        inner_chunks: int = 1,
        storage_options: dict | None = None,
    ) -> "LatentStore":
        """Create a pre-sized store, or open it if it exists with the same shapes and attrs.

        Args:
            url: where (``<root>/latents/<store_id>``).
            num_samples: dataset size N (invalid images included; they get ``valid=False``).
            channels, height, width: latent shape.
            flip: also store ``latents_flip``.
            attrs: JSON-able metadata; must hold :data:`REQUIRED_ATTRS`; ``store_id`` is added (computed).
            chunk_size: samples per unit; default gives ~16 MB of latents per unit.
            codec: a name in :data:`storage.units.CODECS`.
            inner_chunks: >1 makes each unit a Zarr shard of that many chunks.

        Raises:
            ValueError: bad shapes or missing attrs. StoreMismatchError: exists with other settings.
        """
        for name, value in (("channels", channels), ("height", height), ("width", width)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"attrs must contain {list(REQUIRED_ATTRS)}; missing {missing}")
        reserved = {"store_id", "latent_channels", "latent_height", "latent_width", "flip", "scaling_factor",
                    "scaling_factor_measured", "channel_mean", "channel_std", "channel_rms"}
        clash = sorted(reserved & set(attrs))
        if clash:
            raise ValueError(f"attrs keys {clash} are computed by the store; pass the AE's factor as "
                             "'ae_scaling_factor'")
        tail = (int(channels), int(height), int(width))
        if chunk_size is None:
            chunk_size = default_chunk_size(2 * math.prod(tail), num_samples)
        arrays = {"latents": ArraySpec(tail, "float16", codec, inner_chunks)}
        if flip:
            arrays["latents_flip"] = ArraySpec(tail, "float16", codec, inner_chunks)
        arrays["labels"] = ArraySpec((), "int16")
        arrays["valid"] = ArraySpec((), "bool")
        # the store records its own id: readers take it from attrs, never recompute it
        sid = store_id(attrs["dataset_fingerprint"], attrs["ae_fingerprint"], int(attrs["resolution"]),
                       **({"crop": attrs["crop"]} if "crop" in attrs else {}), flip=bool(flip))
        full = {**attrs, "store_id": sid, "latent_channels": tail[0], "latent_height": tail[1], "latent_width": tail[2],
                "flip": bool(flip)}
        return cls._create(url, num_samples=num_samples, unit_size=chunk_size, arrays=arrays, attrs=full,
                           storage_options=storage_options)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        expect_ae: str | None = None,
        expect_dataset: str | None = None,
        expect_resolution: int | None = None,
        storage_options: dict | None = None,
        read_only: bool = False,
    ) -> "LatentStore":
        """Open an existing store, refusing one written for another autoencoder / dataset / resolution.

        Raises:
            StoreNotFoundError: nothing (completely created) there.
            StoreMismatchError: an expectation differs; the message names both values.
        """
        store = cls(url, storage_options=storage_options, read_only=read_only)
        a = store._meta["attrs"]
        problems = []
        if expect_ae is not None and a.get("ae_fingerprint") != expect_ae:
            problems.append(f"autoencoder fingerprint: store has {a.get('ae_fingerprint')!r}, "
                            f"expected {expect_ae!r}")
        if expect_dataset is not None and a.get("dataset_fingerprint") != expect_dataset:
            problems.append(f"dataset fingerprint: store has {a.get('dataset_fingerprint')!r}, "
                            f"expected {expect_dataset!r}")
        if expect_resolution is not None and int(a.get("resolution", -1)) != int(expect_resolution):
            problems.append(f"resolution: store has {a.get('resolution')!r}, expected {expect_resolution!r}")
        if problems:
            raise StoreMismatchError(f"latent store {url!r} does not match: " + "; ".join(problems)
                                     + ". Encode a new store for these inputs (see storage.latent_store.store_id).")
        return store

    # ---------------------------------------------------------------------------------------- properties
    @property
    def channels(self) -> int:
        return int(self._meta["attrs"]["latent_channels"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        a = self._meta["attrs"]
        return int(a["latent_channels"]), int(a["latent_height"]), int(a["latent_width"])

    @property
    def store_id(self) -> str:
        """The id recorded at creation (:func:`store_id` of its dataset, AE, resolution, crop and flip)."""
        sid = self._meta["attrs"].get("store_id")
        if sid is None:
            raise ValueError(f"latent store {self.url!r} records no store_id (written by an older dcae15, whose "
                             "folders are not readable): encode the latents again into a new root")
        return str(sid)

    @property
    def has_flip(self) -> bool:
        return bool(self._meta["attrs"]["flip"])

    @property
    def attrs(self) -> dict:
        """All group attrs (creation attrs, plus statistics once finalized)."""
        return dict(self.group.attrs.asdict())

    @property
    def is_complete(self) -> bool:
        """Every unit written and :meth:`finalize` done."""
        return self.fs.exists(self._p(MARKER_DIR, _FINALIZED))

    @property
    def scaling_factor(self) -> float:
        """The factor that brings latents to ~unit scale: the AE's own if given, else 1/RMS after finalize.

        Raises:
            IncompleteStoreError: no AE factor and the store is not finalized.
        """
        a = self._meta["attrs"]
        if a.get("ae_scaling_factor") is not None:
            return float(a["ae_scaling_factor"])
        stats = self.statistics()
        return float(stats["scaling_factor"])

    def statistics(self) -> dict:
        """The finalize summary (channel mean/std/rms, RMS, scaling factors, num_valid).

        Raises:
            IncompleteStoreError: not finalized yet.
        """
        try:
            return json.loads(self.fs.cat_file(self._p(MARKER_DIR, _FINALIZED)))
        except FileNotFoundError:
            raise IncompleteStoreError(f"latent store {self.url!r} is not finalized: write every unit "
                                       f"({len(self.missing_units())} missing) and call finalize()") from None

    # ---------------------------------------------------------------------------------------- writing
    def write_unit(self, unit: int, latents: np.ndarray, labels: np.ndarray, valid: np.ndarray,
                   latents_flip: np.ndarray | None = None) -> None:
        """Write unit ``unit`` (rows ``unit_bounds(unit)``) and then its completion marker.

        Idempotent: writing the same unit again rewrites the same bytes. Rows with ``valid=False`` are stored as
        zeros whatever was passed. Only one process may write a given unit at a time (one writer per shard).

        Raises:
            ValueError: wrong shapes, labels outside int16, or flips missing/unexpected.
        """
        start, stop = self.unit_bounds(unit)
        want = (stop - start, *self.latent_shape)
        latents, labels = np.asarray(latents), np.asarray(labels)
        valid = np.asarray(valid, dtype=bool)
        for name, arr, shape in (("latents", latents, want), ("latents_flip", latents_flip, want),
                                 ("labels", labels, want[:1]), ("valid", valid, want[:1])):
            if arr is not None and tuple(np.shape(arr)) != shape:
                raise ValueError(f"unit {unit}: {name} must have shape {shape}, got {tuple(np.shape(arr))}")
        if self.has_flip != (latents_flip is not None):
            raise ValueError(f"store flip={self.has_flip} but latents_flip was "
                             f"{'not ' if latents_flip is None else ''}given")
        if labels.size and (labels.min() < -32768 or labels.max() > 32767):
            raise ValueError(f"labels must fit int16, got range [{labels.min()}, {labels.max()}]")
        keep = valid.reshape(-1, 1, 1, 1)
        arrays = {"latents": np.where(keep, latents, 0).astype(np.float16), "labels": labels, "valid": valid}
        if latents_flip is not None:
            arrays["latents_flip"] = np.where(keep, np.asarray(latents_flip), 0).astype(np.float16)
        for name in ("latents", "latents_flip"):
            if name in arrays and not np.isfinite(arrays[name]).all():
                raise ValueError(f"unit {unit}: {name} contain NaN/inf (or overflow float16); refusing to "
                                 "store them")
        x = arrays["latents"][valid].astype(np.float64)  # [n, C, h, w]
        summary = {"num_valid": int(valid.sum()), "sum": x.sum(axis=(0, 2, 3)).tolist(),
                   "sumsq": np.square(x).sum(axis=(0, 2, 3)).tolist()}
        self._write_unit_arrays(unit, arrays, summary)

    def _on_unit_write(self) -> None:
        finalized = self._p(MARKER_DIR, _FINALIZED)
        if self.fs.exists(finalized):
            self.fs.rm_file(finalized)

    def finalize(self) -> dict:
        """Channel statistics from the unit markers, scaling factors into attrs, consolidated metadata, and the
        finalized marker last. Idempotent.

        Raises:
            IncompleteStoreError: some units are missing (the message says how many and which).
        """
        if self.is_complete:
            return self.statistics()
        missing = self.missing_units()
        if missing:
            raise IncompleteStoreError(f"cannot finalize {self.url!r}: {len(missing)} of {self.num_units} units "
                                       f"missing (first {missing[:10]}); encode them first")
        c, h, w = self.latent_shape
        s1, s2, n = np.zeros(c), np.zeros(c), 0
        for unit in range(self.num_units):
            marker = self.unit_marker(unit)
            if marker is None:
                raise IncompleteStoreError(f"unit {unit} marker vanished while finalizing {self.url!r}")
            s1 += np.asarray(marker["sum"])
            s2 += np.asarray(marker["sumsq"])
            n += int(marker["num_valid"])
        if n == 0:
            raise IncompleteStoreError(f"latent store {self.url!r} has no valid samples")
        count = n * h * w
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
        rms = np.sqrt(s2 / count)
        overall = float(np.sqrt(s2.sum() / (count * c)))
        measured = 1.0 / overall if overall > 0 else 1.0
        ae_factor = self._meta["attrs"].get("ae_scaling_factor")
        summary = {
            "num_valid": n,
            "channel_mean": mean.tolist(),
            "channel_std": std.tolist(),
            "channel_rms": rms.tolist(),
            "latent_rms": overall,
            "scaling_factor_measured": measured,
            "scaling_factor": float(ae_factor) if ae_factor is not None else measured,
        }
        if self.read_only:
            raise PermissionError(f"{self.url!r} was opened read-only")
        self._write_row_index()
        self.group.attrs.update(summary)
        self._consolidate()
        put_atomic(self.fs, self._p(MARKER_DIR, _FINALIZED), json.dumps(summary).encode())
        return summary

    # ---------------------------------------------------------------------------------------- reading
    def read_range(self, start: int, stop: int, *, flip: bool = False) -> np.ndarray:
        """Latents (or flipped latents) of rows ``[start, stop)`` as float16."""
        if flip and not self.has_flip:
            raise ValueError(f"store {self.url!r} has no latents_flip")
        return self.group["latents_flip" if flip else "latents"][start:stop]

    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    def valid(self) -> np.ndarray:
        return self.group["valid"][:]

    def _write_row_index(self) -> None:
        buf = io.BytesIO()
        np.savez(buf, labels=self.labels(), valid=self.valid())
        put_atomic(self.fs, self._p(MARKER_DIR, _ROW_INDEX), buf.getvalue())

    def read_row_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int16 [N], valid bool [N])`` with one read of the object :meth:`finalize` writes; stores
        finalized before that object existed fall back to the Zarr arrays (one GET per unit and array)."""
        try:
            raw = self.fs.cat_file(self._p(MARKER_DIR, _ROW_INDEX))
        except FileNotFoundError:
            return self.labels(), self.valid()
        with np.load(io.BytesIO(raw)) as z:
            labels, valid = z["labels"], z["valid"]
        if labels.shape != (self.num_samples,) or valid.shape != (self.num_samples,):
            raise StoreMismatchError(f"{self.url!r}: {MARKER_DIR}/{_ROW_INDEX} holds {labels.shape[0]} rows but "
                                     f"the store has {self.num_samples}; run finalize() on a writable copy again")
        return labels, valid

    def raw_unit_object(self, unit: int, *, flip: bool = False) -> str | None:
        """Path (on :attr:`fs`) of the object holding ``unit``'s latents as plain little-endian float16 rows —
        row ``i`` of the unit at byte ``i * row_bytes`` — or None when the array is compressed or sharded (read
        it through :meth:`read_range` then). The object may be absent: Zarr skips chunks that are all zeros.
        Reads the array's ``zarr.json`` once (not through Zarr: no async client is started for it)."""
        if flip and not self.has_flip:
            raise ValueError(f"store {self.url!r} has no latents_flip")
        name = "latents_flip" if flip else "latents"
        layouts = self.__dict__.setdefault("_raw_layouts", {})
        if name not in layouts:
            layouts[name] = self._raw_layout(name)
        prefix_sep = layouts[name]
        if prefix_sep is None:
            return None
        prefix, sep = prefix_sep
        return prefix + sep.join(str(i) for i in (unit, 0, 0, 0))

    def _raw_layout(self, name: str) -> tuple[str, str] | None:
        """``(path prefix, separator)`` of the chunk objects when they are plain whole-unit rows, else None."""
        spec = self.array_specs[name]
        if spec.get("codec", "none") != "none" or int(spec.get("inner_chunks", 1)) != 1:
            return None
        meta = json.loads(self.fs.cat_file(self._p(name, "zarr.json")))
        codecs = meta.get("codecs", [])
        if [c.get("name") for c in codecs] != ["bytes"] or \
                codecs[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") != \
                [self.unit_size, *self.latent_shape]:
            return None
        enc = meta.get("chunk_key_encoding", {"name": "default"})
        sep = enc.get("configuration", {}).get("separator")
        if enc.get("name") == "default":
            return self._p(name, "c") + (sep or "/"), sep or "/"
        if enc.get("name") == "v2":
            return self._p(name) + "/", sep or "."
        return None
