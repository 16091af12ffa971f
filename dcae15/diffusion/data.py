"""The trainer's input path: a rank's slice of the global batch from the stream readers, prefetched and moved.

Elastic data order: the stream's layout is fixed when a run starts (``data_world_size`` V = the world size then).
Global batch k is the concatenation of the V reader ranks' batch k. A run resumed on ``ws`` ranks gives rank r
rows ``[r·B/ws, (r+1)·B/ws)`` of each global batch, reading them from the one or few layout ranks that hold them
(``layout_ranks``). So the global sequence of batches — hence the data position, derived from the global number
of samples consumed — does not depend on the world size: after a resume on another world size no sample is
repeated or skipped (beyond the < V × workers rows per epoch the reader itself leaves out). At ws = V each rank
runs exactly its own reader and the sequence is the reader's own (bit-exact resume). Cost of ws ≠ V: with ws > V
ranks sharing a layout rank each read it (ws/V-fold reads); with ws < V a rank runs V/ws readers.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import torch

__all__ = ["layout_ranks", "RankBatches", "DevicePrefetcher"]


def layout_ranks(global_batch: int, data_world_size: int, world_size: int, rank: int) -> list[tuple[int, int, int]]:
    """[(layout rank q, lo, hi)]: rows ``lo:hi`` of q's batch, in order, make up ``rank``'s share of the global batch.

    Raises:
        ValueError: the global batch is not divisible by both world sizes.
    """
    for name, n in (("data_world_size", data_world_size), ("world_size", world_size)):
        if global_batch % n:
            raise ValueError(f"global_batch_size={global_batch} is not divisible by {name}={n}")
    ob, lb = global_batch // data_world_size, global_batch // world_size
    a, b = rank * lb, (rank + 1) * lb
    out = []
    for q in range(a // ob, (b - 1) // ob + 1):
        lo, hi = max(a, q * ob) - q * ob, min(b, (q + 1) * ob) - q * ob
        out.append((q, lo, hi))
    return out


class RankBatches:
    """Iterator over this rank's batches: ``{"latents", "labels", "indices", "states": {layout rank: state}}``.

    ``sources`` is ``[(q, iterator of reader batches, lo, hi)]`` as laid out by ``layout_ranks``. With one source
    covering its whole batch the reader's tensors pass through untouched (no copy).
    """

    KEYS = ("latents", "labels", "indices")

    def __init__(self, sources: list[tuple[int, Iterator[dict], int, int]]):
        self.sources = sources

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = []
        for q, it, lo, hi in self.sources:
            b = next(it)
            n = b["latents"].shape[0]
            if hi - lo > n:
                raise ValueError(f"reader rank {q} yielded {n} rows, need {hi - lo}: the stream must be infinite")
            parts.append((q, b, lo, hi, n))
        states = {q: b["state"] for q, b, *_ in parts}
        if len(parts) == 1 and parts[0][2] == 0 and parts[0][3] == parts[0][4]:
            b = parts[0][1]
            return {**{k: b[k] for k in self.KEYS if k in b}, "states": states}
        out = {k: torch.cat([b[k][lo:hi] for _, b, lo, hi, _ in parts]) for k in self.KEYS if k in parts[0][1]}
        return {**out, "states": states}


class DevicePrefetcher:
    """Fetch the next batches in a background thread while the step runs; hand them over on ``device``.

    The thread calls ``next()`` on the source (the reader's gather, pinning by the DataLoader when the device is a
    GPU), so with ``num_workers=0`` the training thread never gathers. ``next()`` then issues the host-to-device
    copy with ``non_blocking=True`` (asynchronous from pinned memory; on CPU ``.to`` is a no-op, no copy).
    """

    def __init__(self, source: Iterator[dict], device: torch.device, depth: int = 2,
                 keys: tuple[str, ...] = ("latents", "labels")):
        self.source, self.device, self.keys = source, device, keys
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                item: Any = (next(self.source), None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                item = (None, exc)
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def __next__(self) -> dict:
        batch, exc = self.q.get()
        if exc is not None:
            raise exc
        for k in self.keys:
            batch[k] = batch[k].to(self.device, non_blocking=True)
        return batch

    def close(self) -> None:
        self.stop.set()
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=10)
