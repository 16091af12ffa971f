"""One checkpointer for both trainers: the payload, then ``latest`` (last), pruning, one async save, resume."""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

from storage.rundir import RunDir
from storage.urls import put_atomic, url_to_fs

__all__ = ["Checkpointer", "save_torch_file", "load_torch_file", "HOLD_AFTER_CHECKPOINT_ENV"]

#: Test hook, off by default (unset in every real run): a file path. Once rank 0 has published a checkpoint it holds
#: still until that file exists, so a test can kill a node while the run is certainly between its first checkpoint
#: and its end, however fast it trains (tests/flows/test_flows_multinode.py).
HOLD_AFTER_CHECKPOINT_ENV = "DCAE15_TEST_HOLD_AFTER_CHECKPOINT"

#: ``write(url)`` writes one checkpoint's payload at ``url`` (on every rank; a rank may write nothing) and returns
#: None once it is written, or a future (an asynchronous save) whose ``result()`` re-raises a failed save.
Write = Callable[[str], "Future | None"]


class Checkpointer:
    """Saves and resumes the checkpoints of one run directory (``storage.rundir.RunDir``).

    The payload format stays with the trainer (the diffusion trainer's DCP directory, the AE's one torch file): it
    hands ``save`` a ``write(url)`` callable. Every rank calls ``save`` at the same steps. A synchronous save is
    complete once every rank's ``write`` returned: after a barrier rank 0 publishes it (``metrics.jsonl`` up to the
    step, then ``latest``, last) and prunes old checkpoints, and a second barrier holds every rank until ``latest``
    names it. An asynchronous save (``write`` returned a future) is published when its future is done: ``poll``
    each step, ``wait`` before the next save and at the end. At most one save is in flight; a failed one raises
    from ``poll`` / ``wait`` and ``latest`` keeps naming the previous checkpoint.

    Used as a context manager around the training loop: leaving it waits for the save in flight, whose error is
    raised unless the loop already raised one (then the save still completes, and the loop's error is the one seen).

    Args:
        run: the run directory.
        keep: checkpoints kept (``prune``); the one ``latest`` names is never deleted.
        rank: this process's rank: rank 0 publishes and prunes.
        group: the process group of the barriers (None: a single process, no barriers).
    """

    def __init__(self, run: RunDir, *, keep: int, rank: int = 0, group: Any = None) -> None:
        self.run, self.keep, self.rank, self.group = run, int(keep), int(rank), group
        self.metrics: list[dict] = []  # the logged rows: resumed ones, then the trainer's (published at each save)
        self._pending: tuple[int, Future] | None = None  # (step, future) of the one save in flight

    # -- resume
    def resume(self, load: Callable[[str], Any], *, drop_partial: bool = False) -> int:
        """Load the checkpoint ``latest`` names and the metrics up to its step; the step to start from (0: none).

        Args:
            load: ``load(url)`` restores the trainer's state from the checkpoint at ``url``.
            drop_partial: rank 0 deletes checkpoints newer than ``latest`` first (saves a kill interrupted; a
                trainer whose payloads are written atomically may leave them to pruning).
        """
        ptr = self.run.latest()
        if ptr is None:
            return 0
        step = int(ptr["step"])
        if drop_partial and self.rank == 0:
            self.run.drop_partial(step)
        load(ptr["checkpoint"])
        self.metrics = self.run.metrics(upto=step)  # rows past the checkpoint are redone
        return step

    # -- saving
    def save(self, step: int, write: Write) -> None:
        """Write the checkpoint of ``step`` (every rank) and publish it, now or, for an async save, once done."""
        self.wait()  # one save in flight at a time
        fut = write(self.run.checkpoint_url(step))
        if fut is not None:
            self._pending = (int(step), fut)
            return
        self._barrier()  # every rank's payload is written before the pointer moves
        self._publish(step)
        self._barrier()  # ... and no rank goes on (or leaves) before ``latest`` names it

    def poll(self) -> None:
        """Publish the save in flight if it completed (re-raising its error); never blocks."""
        if self._pending is not None and self._pending[1].done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) completed, then publish it; its error re-raised, unpublished."""
        if self._pending is None:
            return
        step, fut = self._pending
        self._pending = None
        fut.result()  # re-raises a failed save: `latest` then keeps naming the previous checkpoint
        self._publish(step)

    @property
    def in_flight(self) -> int | None:
        """The step of the save in flight, None when there is none."""
        return None if self._pending is None else self._pending[0]

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        try:  # an error stopped training: let the save in flight finish (its step was checked) and publish it
            self.wait()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass

    def _publish(self, step: int) -> None:
        """The checkpoint of ``step`` is complete: metrics, then the pointer last, then pruning (rank 0)."""
        if self.rank == 0:
            self.run.publish(step, self.metrics)
            self.run.prune(self.keep, step)
            release = os.environ.get(HOLD_AFTER_CHECKPOINT_ENV)  # the test hook above; None in real runs
            while release and not os.path.exists(release):
                time.sleep(0.1)

    def _barrier(self) -> None:
        from dcae15.distributed import io_barrier

        io_barrier(self.group)


# ------------------------------------------------------------------------------------------------ one-file payloads
def save_torch_file(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """``torch.save`` of ``obj`` as one file at ``url``, written atomically (``storage.urls.put_atomic``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    fs, path = url_to_fs(url, storage_options)
    put_atomic(fs, path, buf.getvalue())


def load_torch_file(url: str, storage_options: dict | None = None) -> Any:
    """What ``save_torch_file`` wrote, on the CPU (``weights_only``: tensors and plain containers only)."""
    fs, path = url_to_fs(url, storage_options)
    return torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
