"""Image batches for AE training as a pure function of (seed, step): block-window shuffling over packed shards.

Each epoch the dataset's contiguous blocks (``block_size`` samples, one ranged read each) are permuted; groups
of ``window_blocks`` consecutive blocks of that permutation form a window whose samples are permuted together.
The concatenation is the epoch's order and global batch ``s`` is positions ``[s·B, (s+1)·B)`` of the endless
stream, so resuming at step s needs no other state. Rank ``r`` of ``W`` takes the slice ``[r·B/W, (r+1)·B/W)`` of
each global batch (disjoint, and the same images whatever ``W``). Block *bytes* are read and cached; only the
rank's own images are decoded, so decoding parallelises over ranks and DataLoader workers (:class:`StepBatches`).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from storage.forksafe import in_worker

from dcae15.ae.channels import step_generator
from dcae15.pixels import from_uint8_nhwc

__all__ = ["ImageBatches", "StepBatches"]


class ImageBatches:
    """Deterministic training batches from an image dataset with ``num_samples``, ``labels`` and ``read_bytes``.

    Args:
        dataset: ``storage.shards.ImageDataset`` (or anything with ``num_samples``, ``labels`` and
            ``read_bytes(start, stop) -> [bytes | None]``).
        batch_size: images per step over all ranks (the global batch); a multiple of ``world_size``.
        resolution: centre-crop size.
        seed: base seed of the order and the flips.
        hflip: random horizontal flips (drawn from (seed, step)).
        block_size / window_blocks: read granularity and shuffle window.
        prefetch: read the next batch's blocks in a background thread.
        rank / world_size: this process's slice of each global batch.

    Invalid samples (unreadable files) are replaced by the first valid sample of the rank's slice, so a bad file
    never changes which images the other positions see.
    """

    def __init__(self, dataset, *, batch_size: int, resolution: int, seed: int = 0, hflip: bool = True,
                 block_size: int = 256, window_blocks: int = 4, prefetch: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or block_size < 1 or window_blocks < 1:
            raise ValueError("ImageBatches: batch_size, block_size and window_blocks must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"ImageBatches: batch_size={batch_size} (the global batch) must be a multiple of "
                             f"world_size={world_size}, with 0 <= rank={rank} < world_size; change the batch size "
                             "or the number of processes")
        self.dataset = dataset
        self.n = int(dataset.num_samples)
        if self.n < 1:
            raise ValueError("ImageBatches: the dataset is empty")
        self.batch_size, self.resolution, self.seed, self.hflip = batch_size, resolution, seed, hflip
        self.block_size, self.window_blocks = block_size, window_blocks
        self.rank, self.world_size, self.local_batch = rank, world_size, batch_size // world_size
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.num_blocks = -(-self.n // block_size)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._blocks: OrderedDict[int, list] = OrderedDict()
        self._max_blocks = window_blocks + 2  # raw bytes: a window and its neighbours
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ae-prefetch") if prefetch else None
        self._pending: dict[int, Future] = {}

    # -- order ------------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample indices in the order of ``epoch`` (a permutation of 0..N-1)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            blocks = rng.permutation(self.num_blocks)
            parts = []
            for w in range(0, self.num_blocks, self.window_blocks):
                idx = np.concatenate([np.arange(b * self.block_size, min((b + 1) * self.block_size, self.n))
                                      for b in blocks[w:w + self.window_blocks]])
                parts.append(rng.permutation(idx))
            self._orders[epoch] = np.concatenate(parts)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Sample indices of global batch ``step`` (all ranks)."""
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = pos // self.n, pos % self.n
        return np.array([self.epoch_order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def _mine(self) -> slice:
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of this rank's part of batch ``step``."""
        return self.global_indices(step)[self._mine()]

    # -- reads ------------------------------------------------------------------------------------------------
    def _read_block(self, b: int) -> list:
        start, stop = b * self.block_size, min((b + 1) * self.block_size, self.n)
        return self.dataset.read_bytes(start, stop)  # one ranged read per shard span; decoded per image later

    def _decode(self, blob) -> np.ndarray | None:
        from storage.images import BadImageError, center_crop, decode_image

        if blob is None:
            return None
        try:
            return center_crop(decode_image(blob), self.resolution)
        except BadImageError:
            return None  # packed as valid but unreadable now: replaced below rather than crash the run

    def _block(self, b: int):
        if b in self._blocks:
            self._blocks.move_to_end(b)
            return self._blocks[b]
        fut = self._pending.pop(b, None)
        data = fut.result() if fut is not None else self._read_block(b)
        self._blocks[b] = data
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        return data

    def _prefetch(self, step: int) -> None:
        if self._pool is None:
            return
        for b in sorted(set((self.indices(step) // self.block_size).tolist())):
            if b not in self._blocks and b not in self._pending:
                self._pending[b] = self._pool.submit(self._read_block, b)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of batch ``step``: images float32 [B/W,3,H,W] in [-1,1] and labels int64 [B/W]."""
        idx = self.indices(step)
        blobs = [self._block(int(i) // self.block_size)[int(i) % self.block_size] for i in idx]
        self._prefetch(step + 1)  # read the next batch's blocks while this one is decoded and the model runs
        imgs = [self._decode(b) for b in blobs]
        labels = self.labels[idx]
        valid = np.array([im is not None for im in imgs])
        if not valid.any():
            raise ValueError(f"ImageBatches: no readable image among samples {idx.tolist()} of step {step}")
        if not valid.all():
            first = int(np.flatnonzero(valid)[0])
            for k in np.flatnonzero(~valid):
                imgs[k], labels[k] = imgs[first], labels[first]
        x = from_uint8_nhwc(np.stack(imgs))  # (B/W,3,H,W)
        if self.hflip:  # drawn for the global batch, so a sample's flip does not depend on the world size
            flip = torch.rand(self.batch_size, generator=step_generator(self.seed, step, salt=7))[self._mine()] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous(), torch.as_tensor(labels, dtype=torch.int64)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict:  # sent to DataLoader workers: no thread pool, no cache, no pending reads
        return {**self.__dict__, "_pool": None, "_pending": {}, "_blocks": OrderedDict(), "_orders": OrderedDict()}


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is this rank's batch of that step, for a ``DataLoader`` with
    ``batch_size=None`` and ``sampler=range(start, stop)``: its workers decode upcoming steps in parallel
    (``prefetch_factor`` steps each) while the model trains on the current one. Each worker keeps its own cache
    of block bytes, so a window's blocks are read once per worker (bytes are cheap; decoding is the cost)."""

    def __init__(self, batches: ImageBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return 2**62  # endless: the sampler says which steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        in_worker()  # once per worker: forked workers of a process with Prefect loaded (storage/forksafe.py)
        return self.batches.batch(int(step))
