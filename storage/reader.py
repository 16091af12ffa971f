"""Streaming reader of a latent store: exactly-once epochs over ranks × workers, exact mid-epoch resume.

How an epoch is laid out (all of it a pure function of ``seed``, the epoch and the store):

1. The units are permuted with ``(seed, epoch)``; concatenating their valid rows gives the epoch order of T rows.
2. With W DataLoader workers per rank (W = 1 without workers) there are ``G = world_size × W`` *streams*;
   stream ``g = rank × W + v`` owns the contiguous slice ``[g·L, (g+1)·L)`` of that order, ``L = T // G``.
   Contiguous slices mean each stream reads each of its units once (one ranged GET per unit and flip variant)
   and only units at slice edges are read by two streams. The last ``T mod G`` (< G) rows of the epoch order are left out of that epoch; the unit
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

Reading (what keeps it near memory speed; bench/loader.py, bench/RESULTS.md): ``labels``/``valid`` come from one
object read when the dataset is built (DataLoader workers inherit them). Per plan, a schedule lists the units in
the order they are first needed and, per (unit, flip variant), the sorted rows used; ``reads_in_flight`` threads
read them ahead of the plan (local disk: memory-mapped with read-ahead, mappings kept across epochs, the gather
touches only the pages of the used rows; object storage: one ranged GET per unit and variant, covering the rows
used). An assembler thread builds each batch two batches
ahead — one ``index_select`` per (unit, variant) into an fp16 scratch, one permutation back to plan order — so the
consumer only casts to fp32 and scales in place (``dtype="float16"``: no cast). No Python loop runs over rows.

Resume: every batch carries ``state = {"epoch", "step", ...}`` = the position *after* it (``step`` = rank-level
batches consumed since the start of ``epoch``). ``load_state_dict(state)`` before iterating continues the
sequence exactly. Constraint: the same ``seed``, ``batch_size``, ``world_size``, ``shuffle_chunks`` and number of
DataLoader workers (checked, ``ValueError`` otherwise), except at an epoch boundary (``step == 0``), where any
worker count is fine.
"""

from __future__ import annotations

import collections
import heapq
import mmap
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .forksafe import in_worker
from .latent_store import LatentStore
from .units import IncompleteStoreError
from .urls import is_local

__all__ = ["LatentStreamDataset", "NORMALIZE_MODES", "OUTPUT_DTYPES"]

NORMALIZE_MODES = ("scaling_factor", "channel_stats", "none")
OUTPUT_DTYPES = ("float32", "float16")


@dataclass
class _Plan:
    """One stream's rows for one epoch: dataset row index and flip choice per position."""

    epoch: int
    rows: np.ndarray  # int64 [L]
    flips: np.ndarray  # bool [L]


class LatentStreamDataset(IterableDataset):
    """A torch ``IterableDataset`` over a finalized latent store, yielding whole batches.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``. Each item is a dict: ``latents``
    ``[B, C, h, w]`` (normalised; a fresh contiguous tensor of ``dtype``), ``labels`` int64 ``[B]``, ``indices``
    int64 ``[B]`` (dataset rows), ``flipped`` bool ``[B]``, and ``state`` (resume state after this batch). See the
    module docstring for the epoch layout and the resume constraint.

    Reading: the store's ``labels``/``valid`` are read once, when the dataset is built (one object, see
    :meth:`LatentStore.read_row_index`); DataLoader workers inherit them. Latents are read unit by unit, ahead of
    the plan, by ``reads_in_flight`` threads; of each unit only the rows and flip variant the plan uses are read
    (memory-mapped on local disk, one ranged GET per unit and variant on object storage). A batch is gathered
    with one ``index_select`` per (unit, variant) and normalised with the fp16 -> fp32 cast and one in-place
    multiply (``scaling_factor``); ``dtype="float16"`` skips the cast (half the bytes to move; the consumer casts
    on its device).

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
        prefetch_units: units read ahead beyond the current shuffle window, >= 1.
        reads_in_flight: unit reads (GETs on object storage) running at once, >= 1.
        dtype: ``"float32"`` or ``"float16"`` latents.
    """

    def __init__(self, url: str, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_chunks: int = 4, flip: bool = True, normalize: str = "scaling_factor",
                 infinite: bool = True, storage_options: dict | None = None, prefetch_units: int = 4,
                 reads_in_flight: int = 4, dtype: str = "float32") -> None:
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
        if reads_in_flight < 1:
            raise ValueError(f"reads_in_flight must be >= 1, got {reads_in_flight}")
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
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
        self.reads_in_flight = int(reads_in_flight)
        self.dtype = dtype
        self._state: dict[str, Any] = {"epoch": 0, "step": 0}
        self._meta: dict | None = None  # what planning needs: numpy only, inherited by (or pickled to) workers
        self._source: Any = None  # tests/benchmarks may inject an in-memory source
        self._opened: tuple[int, Any] | None = None  # (pid, store source) opened in this process
        self._setup()  # labels/valid once per rank, before any DataLoader worker starts

    def __getstate__(self) -> dict:  # pickled to spawned workers: store handles are reopened there
        state = self.__dict__.copy()
        state["_opened"] = None
        return state

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
    def source(self) -> Any:
        """The store reader of this process (opened on first use after a fork or unpickling)."""
        if self._source is not None:
            return self._source
        if self._opened is None:
            self._opened = (os.getpid(), _StoreSource(self.url, self.storage_options))
        elif self._opened[0] != os.getpid():  # a forked worker: reopen handles, keep what was read
            self._opened = (os.getpid(), self._opened[1].in_this_process())
        return self._opened[1]

    def _setup(self) -> dict:
        """Read what planning needs once: valid rows, labels (one object), shape and normalisation."""
        if self._meta is not None:
            return self._meta
        source = self.source()
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
        labels, valid = source.row_index()
        unit_size = store.unit_size
        valid_rows = np.flatnonzero(valid)
        self._meta = {
            "unit_size": unit_size,
            "num_units": store.num_units,
            "shape": tuple(store.latent_shape),
            # valid rows of unit u: valid_rows[unit_starts[u]:unit_starts[u + 1]]
            "valid_rows": valid_rows,
            "unit_starts": np.searchsorted(valid_rows, np.arange(store.num_units + 1) * unit_size),
            "labels": np.asarray(labels, np.int16),
            "use_flip": self.flip and store.has_flip,
            "ahead_rows": (self.shuffle_chunks + 1) * unit_size,  # a shuffle window and the unit it ends in
            "normalize": self.normalize,
            "scale_value": float(scale[0]),
            "scale_t": torch.from_numpy(scale.reshape(1, c, 1, 1).copy()),
            "shift_t": torch.from_numpy(shift.reshape(1, c, 1, 1).copy()),
        }
        return self._meta

    def _stream_length(self, meta: dict, streams: int) -> int:
        total = len(meta["valid_rows"])
        length = total // streams
        if length == 0:
            raise ValueError(f"store {self.url!r} has {total} valid samples, fewer than the {streams} streams "
                             f"(world_size × num_workers); use fewer workers or ranks")
        return length

    def _plan(self, meta: dict, epoch: int, stream: int, streams: int, length: int) -> _Plan:
        order_units = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(meta["num_units"])
        vr, us = meta["valid_rows"], meta["unit_starts"]
        order = np.concatenate([vr[us[u]:us[u + 1]] for u in order_units.tolist()])
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
        in_worker()  # a forked worker of a process with Prefect loaded must not die at exit (storage/forksafe.py)
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
        loader = _UnitLoader(self.source(), meta, self.reads_in_flight, self.prefetch_units, self.dtype)
        try:
            for pieces, batch in loader.stream(self._batches(meta, epoch, stream, streams, length, j)):
                k = j * workers + v
                j += 1
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



# -------------------------------------------------------------------------------------------- reading units
class _Schedule:
    """What one plan reads, unit by unit: for each (unit, variant) the sorted unit-local rows it uses, the units
    in the order the plan first needs them, and the last position each unit is needed at (for eviction)."""

    def __init__(self, plan: _Plan, unit_size: int) -> None:
        units = plan.rows // unit_size
        local = plan.rows - units * unit_size
        slot = units * 2 + plan.flips  # (unit, variant)
        order = np.argsort(slot * unit_size + local)  # keys are unique (one per row): no stable sort needed
        self.locals = local[order]
        sorted_slot = slot[order]
        starts = np.flatnonzero(np.r_[True, sorted_slot[1:] != sorted_slot[:-1]])
        ends = np.append(starts[1:], len(order))
        self.spans = {int(k): (int(a), int(b)) for k, a, b in zip(sorted_slot[starts].tolist(), starts, ends)}
        # per plan position: its (unit, variant) slot, and its row relative to the first row read of that slot
        self.slot = slot
        first_row = np.repeat(self.locals[starts], ends - starts)  # sorted order
        self.rel = np.empty_like(local)
        self.rel[order] = self.locals - first_row
        # first and last plan position of each unit, from the same sort (positions grouped by unit)
        sorted_unit = sorted_slot // 2
        ustarts = np.flatnonzero(np.r_[True, sorted_unit[1:] != sorted_unit[:-1]])
        first = np.minimum.reduceat(order, ustarts)
        last = np.maximum.reduceat(order, ustarts)
        by_first = np.argsort(first)
        self.unit_order = sorted_unit[ustarts][by_first].tolist()
        self.first_use = first[by_first]
        self.last_use = dict(zip(sorted_unit[ustarts].tolist(), last.tolist()))
        self.submitted = 0  # units of unit_order handed to the readers so far

    def rows_of(self, unit: int, flip: bool) -> np.ndarray | None:
        span = self.spans.get(unit * 2 + int(flip))
        return None if span is None else self.locals[span[0]:span[1]]


class _StoreSource:
    """Reads of one unit's rows from a latent store, opened in the process that uses it (fork-safe).

    Plain (uncompressed, unsharded) units are read directly: memory-mapped on a local disk, so a gather touches
    only the pages of the rows it uses; one ranged GET per (unit, variant) on object storage, covering the rows
    the stream uses. Other layouts go through Zarr (one whole-chunk read per unit and variant).

    ``MAX_MAPPED_BYTES``: local unit objects kept memory-mapped per process (address space and page tables, ~2 MiB
    per GiB mapped; the data itself is the shared page cache).
    """

    MAX_MAPPED_BYTES = 8 * 2**30

    def __init__(self, url: str, storage_options: dict | None, _store: LatentStore | None = None) -> None:
        self.store = _store or LatentStore.open(url, storage_options=storage_options, read_only=True)
        self.local = is_local(url)
        self.row_bytes = 2 * int(np.prod(self.store.latent_shape))
        self.requests = {"row_index": 0, "unit_reads": 0, "bytes": 0}
        self._lock = threading.Lock()
        self._maps: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._maps_bytes = 0
        for flip in (False, True) if self.store.has_flip else (False,):
            self.store.raw_unit_object(0, flip=flip)  # the layout is read now, at setup

    def _mapped(self, path: str) -> np.ndarray | None:
        """The whole unit object memory-mapped (copy-on-write, never written), kept open across epochs in an LRU
        of at most ``MAX_MAPPED_BYTES``: the page faults that map the page cache into this process then happen
        once per process, not once per epoch (they were ~45 % of the gather; bench/RESULTS.md)."""
        with self._lock:
            unit_map = self._maps.get(path)
            if unit_map is not None:
                self._maps.move_to_end(path)
                return unit_map
        shape = (self.store.unit_size, *self.store.latent_shape)
        try:
            unit_map = np.memmap(path, dtype="<f2", mode="c", shape=shape)
        except FileNotFoundError:
            return None
        except ValueError as exc:  # shorter than a unit: Zarr writes whole chunks, so the object is damaged
            raise ValueError(f"unit object {path!r} is shorter than {shape[0]} rows ({exc}); the store is damaged: "
                             "run LatentStore.verify() and re-encode the units it reports") from None
        _read_ahead(unit_map)
        with self._lock:
            self._maps[path] = unit_map
            self._maps_bytes += unit_map.nbytes
            while self._maps_bytes > self.MAX_MAPPED_BYTES and len(self._maps) > 1:
                _, old = self._maps.popitem(last=False)  # views handed out keep their mapping alive
                self._maps_bytes -= old.nbytes
        return unit_map

    def in_this_process(self) -> "_StoreSource":
        """The same source for a forked DataLoader worker: fresh handles, no metadata read again."""
        store = LatentStore(self.store.url, storage_options=self.store.storage_options, read_only=True,
                            _meta=self.store._meta)
        store.__dict__["_raw_layouts"] = dict(self.store.__dict__.get("_raw_layouts", {}))
        return _StoreSource(self.store.url, self.store.storage_options, _store=store)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.requests[key] += n

    def row_index(self) -> tuple[np.ndarray, np.ndarray]:
        self._count("row_index")
        return self.store.read_row_index()

    def read(self, unit: int, flip: bool, rows: np.ndarray) -> tuple[int, np.ndarray]:
        """``(r0, a)`` with ``r0 = rows[0]``: ``a[i]`` is the latent of unit-local row ``r0 + i``, for every
        ``i`` up to ``rows[-1] - r0`` (``rows`` sorted)."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        shape = (hi - lo, *self.store.latent_shape)
        path = self.store.raw_unit_object(unit, flip=flip)
        self._count("unit_reads")
        if path is None:
            start, _ = self.store.unit_bounds(unit)
            self._count("bytes", shape[0] * self.row_bytes)
            return lo, self.store.read_range(start + lo, start + hi, flip=flip)
        if self.local:
            unit_map = self._mapped(path)
            if unit_map is None:  # Zarr writes no object for an all-zero unit
                return lo, np.zeros(shape, np.float16)
            self._count("bytes", len(rows) * self.row_bytes)
            return lo, unit_map[lo:hi]
        try:
            raw = self.store.fs.cat_file(path, start=lo * self.row_bytes, end=hi * self.row_bytes)
        except FileNotFoundError:
            return lo, np.zeros(shape, np.float16)
        self._count("bytes", len(raw))
        return lo, np.frombuffer(bytearray(raw), dtype="<f2").reshape(shape)  # writable: torch.from_numpy


def _read_ahead(arr: np.memmap) -> None:
    """Start reading the mapped span from disk now (asynchronous read-ahead; nothing to do on a warm page cache).

    One call per (unit, variant): on a cold cache the whole span is read, both variants' pages. Per-run calls
    (only the used rows' pages) or ``MADV_POPULATE_READ`` (no page faults later) cost 1.5-2x the CPU of the
    gather itself with random per-row flips (measured: bench/RESULTS.md), so the gather takes the page faults.
    """
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_WILLNEED)
        except (OSError, ValueError):  # advisory only
            pass


def _empty(shape: tuple, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """A new tensor; in a DataLoader worker it is born in shared memory, so handing it to the main process
    costs no copy (what ``default_collate`` does for its batches)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.tensor([], dtype=dtype).set_(storage).view(shape)


def _read_tensor(source: Any, unit: int, flip: bool, rows: np.ndarray) -> tuple[int, torch.Tensor]:
    r0, arr = source.read(unit, flip, rows)
    if not arr.flags.writeable:  # torch wants writable memory; a read-only source is copied once per unit
        arr = arr.copy()
    return r0, torch.from_numpy(np.ascontiguousarray(arr))


class _UnitLoader:
    """Builds batches from unit reads that a thread pool runs ahead of the plan (``reads_in_flight`` at once).

    Units are read in the order the plan first needs them: every unit of the next ``ahead_rows`` positions (a
    shuffle window and the unit it ends in) plus ``prefetch_units`` more. A unit is dropped after the last
    position of its plan that uses it. Only the flip variant(s) a unit's rows use are read.
    """

    AHEAD = 2  # batches assembled ahead of the consumer

    def __init__(self, source: Any, meta: dict, reads_in_flight: int, prefetch_units: int, dtype: str) -> None:
        self.source, self.meta = source, meta
        self.unit_size = meta["unit_size"]
        self.prefetch_units = prefetch_units
        self.pool = ThreadPoolExecutor(max_workers=reads_in_flight, thread_name_prefix="latent-read")
        self.assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-batch")
        self.schedules: dict[int, _Schedule] = {}  # by plan epoch
        self.cache: dict[tuple[int, int], dict[int, Future]] = {}  # (epoch, unit) -> {variant: read}
        self.expiry: list[tuple[int, int, int]] = []  # heap of (epoch, last position used, unit) in the cache
        self.dtype = dtype
        self.scratch = torch.empty(0, dtype=torch.float16)
        self.recycled: queue.SimpleQueue = queue.SimpleQueue()  # fp16 batches the consumer is done with

    def _schedule(self, plan: _Plan) -> _Schedule:
        sched = self.schedules.get(plan.epoch)
        if sched is None:
            sched = self.schedules[plan.epoch] = _Schedule(plan, self.unit_size)
        return sched

    def _submit_until(self, plan: _Plan, sched: _Schedule, position: int) -> None:
        """Start the reads of every unit first needed before ``position``, then ``prefetch_units`` more."""
        need = int(np.searchsorted(sched.first_use, position, side="left"))
        until = min(len(sched.unit_order), need + self.prefetch_units)
        while sched.submitted < until:
            unit = sched.unit_order[sched.submitted]
            sched.submitted += 1
            reads = {}
            for variant in (0, 1):
                rows = sched.rows_of(unit, bool(variant))
                if rows is not None:
                    reads[variant] = self.pool.submit(_read_tensor, self.source, unit, bool(variant), rows)
            self.cache[(plan.epoch, unit)] = reads
            heapq.heappush(self.expiry, (plan.epoch, sched.last_use[unit], unit))

    def stream(self, batches: Iterator) -> Iterator[tuple[list, dict]]:
        """``(pieces, batch)`` in plan order. Each batch is assembled (gathered into fp16, plan order) on the
        assembler thread ``AHEAD`` batches before it is needed, while this thread casts and normalises the
        previous one — torch ops release the GIL, so the two overlap."""
        pending: collections.deque = collections.deque()
        for _, pieces in batches:
            pending.append((pieces, self.assembler.submit(self.assemble, pieces)))
            if len(pending) > self.AHEAD:
                done, fut = pending.popleft()
                yield done, self.finish(*fut.result())
        while pending:
            done, fut = pending.popleft()
            yield done, self.finish(*fut.result())

    def assemble(self, pieces: list) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The batch's latents as fp16 in plan order (assembler thread only: it owns the cache and scratch)."""
        ahead = self.meta["ahead_rows"]
        slots = 2 * self.meta["num_units"]
        rows, flips, keys, rels, epochs = [], [], [], [], []
        for piece, (plan, a, b) in enumerate(pieces):
            sched = self._schedule(plan)
            self._submit_until(plan, sched, b + ahead)
            rows.append(plan.rows[a:b])
            flips.append(plan.flips[a:b])
            keys.append(sched.slot[a:b] + piece * slots if piece else sched.slot[a:b])
            rels.append(sched.rel[a:b])
            epochs.append(plan.epoch)
        rows, flips, key, rel = (x[0] if len(pieces) == 1 else np.concatenate(x) for x in (rows, flips, keys, rels))
        n = len(rows)
        # Group the batch by (piece, unit, variant): one index_select per group straight into a scratch batch,
        # then one permutation back to plan order (both fp16 copies, cheaper than the cast that follows).
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
        stops = np.r_[starts[1:], n]
        group_keys = sorted_key[starts]
        shape = (n, *self.meta["shape"])
        if self.scratch.shape[0] < n:
            self.scratch = torch.empty(shape, dtype=torch.float16)
        grouped = self.scratch[:n]
        rel_t = torch.from_numpy(rel[order])
        for k, a, b in zip(group_keys.tolist(), starts.tolist(), stops.tolist()):
            piece, slot = divmod(k, slots)
            _, src = self.cache[(epochs[piece], slot // 2)][slot % 2].result()
            torch.index_select(src, 0, rel_t[a:b], out=grouped[a:b])
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        if self.dtype == "float16":  # this tensor is the output: a new one (in shared memory in a worker)
            out = _empty(shape, torch.float16, get_worker_info() is not None)
        else:  # internal: recycled from the consumer, no fresh pages (and page faults) per batch
            try:
                out = self.recycled.get_nowait()
            except queue.Empty:
                out = torch.empty(shape, dtype=torch.float16)
            if tuple(out.shape) != shape:
                out = torch.empty(shape, dtype=torch.float16)
        x16 = torch.index_select(grouped, 0, inverse, out=out)
        self._evict(pieces)
        return x16, rows, flips

    def finish(self, x16: torch.Tensor, rows: np.ndarray, flips: np.ndarray) -> dict:
        """Cast and normalise (fp16 -> fp32 copy and one in-place op for a scalar factor, two for channel
        statistics) and attach labels; in a DataLoader worker every tensor is born in shared memory."""
        meta = self.meta
        shared = get_worker_info() is not None
        if self.dtype == "float16":
            x = x16
        else:
            x = _empty(tuple(x16.shape), torch.float32, shared).copy_(x16)
            self.recycled.put(x16)
        # (fp16 arithmetic on CPU computes each element in fp32 and rounds once per op)
        if meta["normalize"] == "scaling_factor":
            x.mul_(meta["scale_value"])
        elif meta["normalize"] == "channel_stats":
            x.sub_(meta["shift_t"].to(x.dtype)).mul_(meta["scale_t"].to(x.dtype))
        n = len(rows)
        labels = _empty((n,), torch.int64, shared)
        labels.numpy()[:] = meta["labels"][rows]
        indices = _empty((n,), torch.int64, shared)
        indices.numpy()[:] = rows
        flipped = _empty((n,), torch.bool, shared)
        flipped.numpy()[:] = flips
        return {"latents": x, "labels": labels, "indices": indices, "flipped": flipped}

    def _evict(self, pieces: list) -> None:
        """Drop the units no later position needs (they recur only in a later epoch's plan)."""
        plan, _, b = pieces[-1]
        while self.expiry and self.expiry[0][:2] < (plan.epoch, b):
            epoch, _, unit = heapq.heappop(self.expiry)
            self.cache.pop((epoch, unit), None)
        for epoch in [e for e in self.schedules if e < plan.epoch]:
            del self.schedules[epoch]

    def close(self) -> None:
        self.assembler.shutdown(wait=True, cancel_futures=True)
        for reads in self.cache.values():
            for fut in reads.values():
                fut.cancel()
        self.cache.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
