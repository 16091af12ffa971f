"""A Zarr v3 store of generated images (uint8 ``[N,H,W,3]`` + labels), written per unit so sampling resumes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .units import ArraySpec, IncompleteStoreError, UnitStore

__all__ = ["SampleStore"]


class SampleStore(UnitStore):
    """Generated samples at ``<root>/samples/<id>/``: ``images`` uint8 ``[N, H, W, 3]``, ``labels`` int16 ``[N]``.

    Same unit/marker machinery as the latent store (:class:`storage.units.UnitStore`): a killed sampling job
    reruns only :meth:`missing_units`. Images are stored as one zstd-compressed chunk per unit. There is no
    finalize step: the store is complete when ``missing_units()`` is empty (``read_all`` refuses otherwise).
    """

    KIND = "sample-store"

    @classmethod
    def create(cls, url: str, *, num_samples: int, height: int, width: int, attrs: dict[str, Any],
               chunk_size: int = 256, codec: str = "zstd1", storage_options: dict | None = None) -> "SampleStore":
        """Create a pre-sized store, or open it if it exists with the same settings.

        Args:
            attrs: JSON-able metadata (e.g. run id, checkpoint, sampler, steps, cfg scale, seed).
            chunk_size: images per unit (the resume granularity of sampling).

        Raises:
            ValueError: bad sizes. StoreMismatchError: exists with other settings.
        """
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"height and width must be >= 1, got {height}, {width}")
        arrays = {"images": ArraySpec((int(height), int(width), 3), "uint8", codec), "labels": ArraySpec((), "int16")}
        return cls._create(url, num_samples=num_samples, unit_size=min(int(chunk_size), int(num_samples)),
                           arrays=arrays, attrs=dict(attrs), storage_options=storage_options)

    @classmethod
    def open(cls, url: str, *, storage_options: dict | None = None, read_only: bool = False) -> "SampleStore":
        """Open an existing store. Raises StoreNotFoundError when there is none."""
        return cls(url, storage_options=storage_options, read_only=read_only)

    @property
    def attrs(self) -> dict:
        return dict(self._meta["attrs"])

    def write_unit(self, unit: int, images: np.ndarray, labels: np.ndarray, *, writer: dict | None = None) -> None:
        """Write unit ``unit``'s images (uint8 ``[n,H,W,3]``) and labels, then its marker. Idempotent.

        ``writer`` (JSON-able, e.g. rank, node, host) is recorded in the unit's marker: which process drew it.

        Raises:
            ValueError: wrong shape or a dtype other than uint8.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        labels = np.asarray(labels)
        if labels.size and (labels.min() < -32768 or labels.max() > 32767):
            raise ValueError(f"labels must fit int16, got range [{labels.min()}, {labels.max()}]")
        self._write_unit_arrays(unit, {"images": images, "labels": labels}, {"writer": writer} if writer else None)

    def read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of rows ``[start, stop)`` (rows of unwritten units are zeros)."""
        return self.group["images"][start:stop], self.group["labels"][start:stop].astype(np.int64)

    def iter_units(self, units: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) of one unit at a time (one GET each), in unit order: what a reader of a 50 000-image store
        holds is one unit, never the store (``read_all`` holds it all: small stores only).

        Raises:
            IncompleteStoreError: a unit to read is not written yet.
        """
        todo = range(self.num_units) if units is None else [int(u) for u in units]
        missing = sorted(set(todo) & set(self.missing_units()))
        if missing:
            raise IncompleteStoreError(f"sample store {self.url!r}: units {missing[:10]} of {self.num_units} are not "
                                       "written; rerun sampling to finish it")
        for unit in todo:
            yield self.read_range(*self.unit_bounds(unit))

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All images and labels.

        Raises:
            IncompleteStoreError: some units are not written yet.
        """
        missing = self.missing_units()
        if missing:
            raise IncompleteStoreError(f"sample store {self.url!r}: {len(missing)} of {self.num_units} units "
                                       f"missing (first {missing[:10]}); rerun sampling to finish it")
        return self.read_range(0, self.num_samples)
