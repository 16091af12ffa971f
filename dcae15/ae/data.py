"""Image batches for AE training as a pure function of (seed, step): block-window shuffling over packed shards.

Each epoch the dataset's contiguous blocks (``block_size`` samples, one ``read_range`` each) are permuted; groups
of ``window_blocks`` consecutive blocks of that permutation form a window whose samples are permuted together.
The concatenation is the epoch's order and batch ``s`` is positions ``[s·B, (s+1)·B)`` of the endless stream, so
resuming at step s needs no other state. Reads are whole blocks, cached and prefetched one batch ahead.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from dcae15.ae.channels import step_generator

__all__ = ["ImageBatches"]


class ImageBatches:
    """Deterministic training batches from an image dataset with ``num_samples`` and ``read_range``.

    Args:
        dataset: ``storage.shards.ImageDataset`` (or anything with ``num_samples`` and
            ``read_range(start, stop, size) -> (uint8 [n,H,W,3], labels [n], valid [n])``).
        batch_size: images per step.
        resolution: crop size passed to ``read_range``.
        seed: base seed of the order and the flips.
        hflip: random horizontal flips (drawn from (seed, step)).
        block_size / window_blocks: read granularity and shuffle window.
        prefetch: read the next batch's blocks in a background thread.

    Invalid samples (unreadable files) are replaced by the first valid sample of the same batch, so a bad file
    never changes which images the other positions see.
    """

    def __init__(self, dataset, *, batch_size: int, resolution: int, seed: int = 0, hflip: bool = True,
                 block_size: int = 256, window_blocks: int = 4, prefetch: bool = True) -> None:
        if batch_size < 1 or block_size < 1 or window_blocks < 1:
            raise ValueError("ImageBatches: batch_size, block_size and window_blocks must be >= 1")
        self.dataset = dataset
        self.n = int(dataset.num_samples)
        if self.n < 1:
            raise ValueError("ImageBatches: the dataset is empty")
        self.batch_size, self.resolution, self.seed, self.hflip = batch_size, resolution, seed, hflip
        self.block_size, self.window_blocks = block_size, window_blocks
        self.num_blocks = -(-self.n // block_size)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._max_blocks = 2 * window_blocks + 2
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

    def indices(self, step: int) -> np.ndarray:
        """Sample indices of batch ``step``."""
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = pos // self.n, pos % self.n
        return np.array([self.epoch_order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    # -- reads ------------------------------------------------------------------------------------------------
    def _read_block(self, b: int):
        start, stop = b * self.block_size, min((b + 1) * self.block_size, self.n)
        images, labels, valid = self.dataset.read_range(start, stop, self.resolution)
        return np.asarray(images), np.asarray(labels), np.asarray(valid, dtype=bool)

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
        """Batch ``step``: images float32 [B,3,H,W] in [-1,1] and labels int64 [B]."""
        idx = self.indices(step)
        imgs, labels, valid = [], [], []
        for i in idx:
            im, lab, val = self._block(int(i) // self.block_size)
            j = int(i) % self.block_size
            imgs.append(im[j]), labels.append(lab[j]), valid.append(val[j])
        self._prefetch(step + 1)  # read the next batch's blocks while the model runs on this one
        valid_arr = np.array(valid)
        if valid_arr.any() and not valid_arr.all():
            first = int(np.flatnonzero(valid_arr)[0])
            for k in np.flatnonzero(~valid_arr):
                imgs[k], labels[k] = imgs[first], labels[first]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B,3,H,W)
        if self.hflip:
            flip = torch.rand(len(idx), generator=step_generator(self.seed, step, salt=7)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous(), torch.as_tensor(np.array(labels), dtype=torch.int64)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
