"""Streaming reader of a latent store: exactly-once epochs over ranks × workers, exact mid-epoch resume.

How an epoch is laid out (all of it a pure function of ``seed``, the epoch and the store):

1. The units are permuted with ``(seed, epoch)``; concatenating their valid rows gives the epoch order of T rows.
2. With W DataLoader workers per rank (W = 1 without workers) there are ``G = world_size × W`` *streams*;
   stream ``g = rank × W + v`` owns the contiguous slice ``[g·L, (g+1)·L)`` of that order, ``L = T // G``.
   Contiguous slices mean each stream reads whole units (one GET per array) and only units at slice edges are
   read by two streams. The last ``T mod G`` (< G) rows of the epoch order are left out of that epoch; the unit
   permutation changes every epoch, so different rows are left out each time.
3. Inside its slice a stream shuffles windows of ``shuffle_chunks`` units' worth of rows (a shuffle buffer that is
   exactly reproducible) and picks ``latents`` or ``latents_flip`` per row with probability ½ (store with flips
   and ``flip=True``).
4. Batches: rank-level batch ``k`` is batch ``k // W`` of stream ``v = k mod W``, which is the order in which
   ``DataLoader`` returns the workers' batches. Every stream has the same length, so **every rank yields the same
   number of batches** and distributed training never waits on a rank that ran dry. Finite mode
   (``infinite=False``): one epoch per ``__iter__``, ``ceil(L / batch_size)`` batches per stream, the last one
   short (same size on every stream). Infinite mode: each stream runs on into the next epoch, so every batch is
   full and a batch may straddle two epochs; per epoch every row but the < G left-out ones is seen exactly once.

Resume: every batch carries ``state = {"epoch", "step", ...}`` = the position *after* it (``step`` = rank-level
batches consumed since the start of ``epoch``). ``load_state_dict(state)`` before iterating continues the
sequence exactly. Constraint: the same ``seed``, ``batch_size``, ``world_size``, ``shuffle_chunks`` and number of
DataLoader workers (checked, ``ValueError`` otherwise), except at an epoch boundary (``step == 0``), where any
worker count is fine.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .latent_store import LatentStore
from .units import IncompleteStoreError

__all__ = ["LatentStreamDataset", "NORMALIZE_MODES"]

NORMALIZE_MODES = ("scaling_factor", "channel_stats", "none")


@dataclass
class _Plan:
    """One stream's rows for one epoch: dataset row index and flip choice per position."""

    epoch: int
    rows: np.ndarray  # int64 [L]
    flips: np.ndarray  # bool [L]


class LatentStreamDataset(IterableDataset):
    """A torch ``IterableDataset`` over a finalized latent store, yielding whole batches.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``. Each item is a dict: ``latents`` float32
    ``[B, C, h, w]`` (normalised), ``labels`` int64 ``[B]``, ``indices`` int64 ``[B]`` (dataset rows),
    ``flipped`` bool ``[B]``, and ``state`` (resume state after this batch). See the module docstring for the
    epoch layout and the resume constraint.

    Args:
        url: the latent store.
        batch_size: per-rank batch size.
        seed: base seed of every permutation and flip choice.
        rank, world_size: this process's place among the data-parallel ranks.
        shuffle_chunks: units' worth of rows shuffled together (the shuffle buffer), >= 1.
        flip: use ``latents_flip`` with probability ½ when the store has it.
        normalize: ``"scaling_factor"`` (x · s), ``"channel_stats"`` ((x − mean_c) / std_c) or ``"none"``.
        infinite: run on across epochs (training) instead of one epoch per iteration.
        storage_options: fsspec options for the store URL.
        prefetch_units: units read ahead by the background thread.
    """

    def __init__(self, url: str, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_chunks: int = 4, flip: bool = True, normalize: str = "scaling_factor",
                 infinite: bool = True, storage_options: dict | None = None, prefetch_units: int = 2) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_chunks < 1:
            raise ValueError(f"shuffle_chunks must be >= 1, got {shuffle_chunks}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if prefetch_units < 1:
            raise ValueError(f"prefetch_units must be >= 1, got {prefetch_units}")
        self.url = url
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle_chunks = int(shuffle_chunks)
        self.flip = bool(flip)
        self.normalize = normalize
        self.infinite = bool(infinite)
        self.storage_options = storage_options
        self.prefetch_units = int(prefetch_units)
        self._state: dict[str, Any] = {"epoch": 0, "step": 0}
        self._meta: dict | None = None  # per-process cache of what the plan needs (opened lazily)
        self._source: Any = None  # tests/benchmarks may inject an in-memory source

    # ---------------------------------------------------------------------------------------- state
    def _guard(self, num_workers: int) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "shuffle_chunks": self.shuffle_chunks, "num_workers": num_workers, "infinite": self.infinite}

    def state_dict(self) -> dict:
        """The resume state as last loaded / reached in this process. Checkpoint the ``state`` of the last
        batch you consumed instead when using DataLoader workers (their progress never reaches this object)."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a batch's ``state``) on the next iteration.

        Raises:
            ValueError: malformed state, or one recorded with another seed / batch size / world size.
        """
        if not isinstance(state, dict) or "epoch" not in state or "step" not in state:
            raise ValueError(f"state must be a dict with 'epoch' and 'step', got {state!r}")
        for key in ("seed", "batch_size", "world_size", "shuffle_chunks", "infinite"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: state has {key}={state[key]!r} but this reader has "
                                 f"{key}={getattr(self, key)!r}; exact resume needs the same value")
        self._state = dict(state)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self._state = {"epoch": int(epoch), "step": 0}

    # ---------------------------------------------------------------------------------------- setup
    def _setup(self) -> dict:
        """Open the store (in this process) and read what planning needs: valid mask, labels, normalisation."""
        if self._meta is not None:
            return self._meta
        source = self._source or _StoreSource(self.url, self.storage_options)
        store = source.store
        if not store.is_complete:
            raise IncompleteStoreError(f"latent store {self.url!r} is not complete ({len(store.missing_units())} "
                                       "units missing or finalize() not run); finish encoding first")
        c = store.channels
        if self.normalize == "scaling_factor":
            scale, shift = np.full(c, store.scaling_factor, np.float32), np.zeros(c, np.float32)
        elif self.normalize == "channel_stats":
            stats = store.statistics()
            std = np.asarray(stats["channel_std"], np.float32)
            scale, shift = 1.0 / np.maximum(std, 1e-8), np.asarray(stats["channel_mean"], np.float32)
        else:
            scale, shift = np.ones(c, np.float32), np.zeros(c, np.float32)
        valid = source.valid()
        unit_size = store.unit_size
        self._meta = {
            "source": source,
            "unit_size": unit_size,
            "num_units": store.num_units,
            "valid_rows": [np.flatnonzero(valid[u * unit_size:(u + 1) * unit_size]) + u * unit_size
                           for u in range(store.num_units)],
            "labels": source.labels().astype(np.int64),
            "use_flip": self.flip and store.has_flip,
            "ahead_rows": (self.shuffle_chunks + 1) * unit_size,  # a shuffle window and the unit it ends in
            "scale": scale.reshape(1, c, 1, 1),
            "shift": shift.reshape(1, c, 1, 1),
        }
        return self._meta

    def _stream_length(self, meta: dict, streams: int) -> int:
        total = sum(len(r) for r in meta["valid_rows"])
        length = total // streams
        if length == 0:
            raise ValueError(f"store {self.url!r} has {total} valid samples, fewer than the {streams} streams "
                             f"(world_size × num_workers); use fewer workers or ranks")
        return length

    def _plan(self, meta: dict, epoch: int, stream: int, streams: int, length: int) -> _Plan:
        order_units = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(meta["num_units"])
        order = np.concatenate([meta["valid_rows"][u] for u in order_units])
        rows = order[stream * length:(stream + 1) * length].copy()
        window = self.shuffle_chunks * meta["unit_size"]
        for m, a in enumerate(range(0, length, window)):
            b = min(a + window, length)
            rows[a:b] = rows[a:b][np.random.default_rng([self.seed, epoch, stream, m]).permutation(b - a)]
        if meta["use_flip"]:
            flips = np.random.default_rng([self.seed, epoch, stream, 0xF11B]).random(length) < 0.5
        else:
            flips = np.zeros(length, bool)
        return _Plan(epoch, rows, flips)

    def batches_per_epoch(self, num_workers: int = 0) -> int:
        """Batches one rank yields per epoch in finite mode (opens the store in this process)."""
        meta = self._setup()
        w = max(1, num_workers)
        length = self._stream_length(meta, self.world_size * w)
        return w * -(-length // self.batch_size)

    # ---------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, step = int(self._state["epoch"]), int(self._state["step"])
        recorded = self._state.get("num_workers")
        if step and recorded is not None and recorded != workers:
            raise ValueError(f"cannot resume mid-epoch (step {step}) with {workers} DataLoader workers: the state "
                             f"was recorded with num_workers={recorded}; use the same number")
        meta = self._setup()
        streams = self.world_size * workers
        length = self._stream_length(meta, streams)
        per_stream = -(-length // self.batch_size)  # batches per stream per epoch in finite mode
        if not self.infinite and step >= workers * per_stream:
            epoch, step = epoch + 1, 0
        first = step + worker  # this worker's first rank-level batch
        v = first % workers
        stream = self.rank * workers + v
        guard = self._guard(workers)
        j = first // workers
        in_process = info is None
        loader = _UnitLoader(meta["source"], meta["use_flip"], self.prefetch_units)
        try:
            for positions, pieces in self._batches(meta, epoch, stream, streams, length, j):
                k = j * workers + v
                j += 1
                batch = loader.gather(pieces, meta)
                if self.infinite:
                    state = {"epoch": epoch, "step": k + 1}
                elif k + 1 >= workers * per_stream:
                    state = {"epoch": epoch + 1, "step": 0}
                else:
                    state = {"epoch": epoch, "step": k + 1}
                state.update(guard)
                state["data_epoch"] = pieces[-1][0].epoch
                if in_process:
                    self._state = dict(state)
                batch["state"] = state
                yield batch
        finally:
            loader.close()

    def _batches(self, meta: dict, epoch: int, stream: int, streams: int, length: int, j0: int):
        """Yield, per batch of this stream from local batch ``j0`` on, the list of (plan, lo, hi) pieces."""
        bs = self.batch_size
        pos = j0 * bs
        if not self.infinite:
            if pos >= length:
                return
            plan = self._plan(meta, epoch, stream, streams, length)
            for a in range(pos, length, bs):
                yield a, [(plan, a, min(a + bs, length))]
            return
        e = epoch + pos // length
        offset = pos % length
        plan = self._plan(meta, e, stream, streams, length)
        while True:
            pieces, need = [], bs
            while need:
                take = min(need, length - offset)
                pieces.append((plan, offset, offset + take))
                need -= take
                offset += take
                if offset == length:
                    e, offset = e + 1, 0
                    plan = self._plan(meta, e, stream, streams, length)
            yield None, pieces


class _StoreSource:
    """Whole-unit reads from a latent store, opened in the process that uses it (fork-safe)."""

    def __init__(self, url: str, storage_options: dict | None) -> None:
        self.store = LatentStore.open(url, storage_options=storage_options, read_only=True)

    def valid(self) -> np.ndarray:
        return self.store.valid()

    def labels(self) -> np.ndarray:
        return self.store.labels()

    def read_unit(self, unit: int, flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
        start, stop = self.store.unit_bounds(unit)
        lat = self.store.read_range(start, stop)
        return lat, (self.store.read_range(start, stop, flip=True) if flip else None)


class _UnitLoader:
    """A cache of whole units with a background thread that reads the next units while batches are built."""

    def __init__(self, source: Any, use_flip: bool, prefetch: int) -> None:
        self.source, self.use_flip = source, use_flip
        self.cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.requests: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue(maxsize=prefetch)
        self.pending: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            unit = self.requests.get()
            if unit is None:
                return
            try:
                item = (unit, self.source.read_unit(unit, self.use_flip), None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                item = (unit, None, exc)
            while not self.stop.is_set():
                try:
                    self.done.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _want(self, units: list[int]) -> None:
        for u in units:
            if u not in self.cache and u not in self.pending:
                self.pending.append(u)
                self.requests.put(u)

    def _wait_for(self, units: set[int]) -> None:
        while not units <= self.cache.keys():
            unit, arrays, exc = self.done.get()
            self.pending.remove(unit)
            if exc is not None:
                raise exc
            self.cache[unit] = arrays

    def gather(self, pieces: list, meta: dict) -> dict:
        unit_size = meta["unit_size"]
        rows = np.concatenate([p.rows[a:b] for p, a, b in pieces])
        flips = np.concatenate([p.flips[a:b] for p, a, b in pieces])
        units = rows // unit_size
        need = list(dict.fromkeys(units.tolist()))
        # Ask for this batch's units, then for the next units of the plan so they load while we gather.
        self._want(need)
        plan, _, b = pieces[-1]
        ahead = list(dict.fromkeys((plan.rows[b:b + meta["ahead_rows"]] // unit_size).tolist()))
        self._want([u for u in ahead if u not in self.cache][: self.done.maxsize])
        self._wait_for(set(need))
        first = self.cache[need[0]][0]
        out = np.empty((len(rows), *first.shape[1:]), np.float16)
        for u in need:
            sel = units == u
            local = rows[sel] - u * unit_size
            lat, lat_flip = self.cache[u]
            if lat_flip is not None:
                f = flips[sel]
                out[sel] = np.where(f.reshape(-1, 1, 1, 1), lat_flip[local], lat[local])
            else:
                out[sel] = lat[local]
        # Units no later position of the plan needs are dropped (they only recur in a later epoch's plan).
        keep = set(need) | set(ahead) | set(self.pending)
        for u in list(self.cache):
            if u not in keep:
                del self.cache[u]
        x = (out.astype(np.float32) - meta["shift"]) * meta["scale"]
        return {"latents": torch.from_numpy(x), "labels": torch.from_numpy(meta["labels"][rows]),
                "indices": torch.from_numpy(rows.astype(np.int64)), "flipped": torch.from_numpy(flips.copy())}

    def close(self) -> None:
        self.stop.set()
        self.requests.put(None)
        self.thread.join(timeout=5)
