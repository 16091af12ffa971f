"""One writer per artifact for jobs that may run as several ranks: rank 0 takes the artifact's lease
(``storage.lease.claim``) before any rank writes, and the other ranks wait for its word.

The other ranks poll the process group's key-value store instead of waiting in a collective: a second training of a
run may wait hours for the first, longer than any NCCL / gloo collective timeout. Every rank makes the same claims
in the same order, so a per-process counter names each claim's key.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Iterator

from storage.lease import ClaimHeldError, Lease, claim

__all__ = ["rank_zero_claim"]

_COUNTER = itertools.count()
_HELD, _REFUSED = "held", "refused:"


@contextlib.contextmanager
def rank_zero_claim(url: str, *, what: str, storage_options: dict | None = None) -> Iterator[Lease | None]:
    """Hold the artifact's lease for the body on rank 0 (the only rank in a plain process); the other ranks enter
    the body once rank 0 holds it. Yields the lease on rank 0, None elsewhere.

    Raises:
        ClaimHeldError: on every rank, when rank 0 was refused (another live writer holds the artifact).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        with claim(url, what=what, storage_options=storage_options) as lease:
            yield lease
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store, key = _get_default_store(), f"dcae15/claim/{next(_COUNTER)}"
    if dist.get_rank() != 0:
        while not store.check([key]):
            time.sleep(0.5)
        word = store.get(key).decode()
        if word.startswith(_REFUSED):
            raise ClaimHeldError(word[len(_REFUSED):])
        if word != _HELD:
            raise RuntimeError(f"rank 0 could not claim {what} {url}: {word}")
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            lease = stack.enter_context(claim(url, what=what, storage_options=storage_options))
        except ClaimHeldError as exc:
            store.set(key, _REFUSED + str(exc))
            raise
        except BaseException as exc:
            store.set(key, f"{type(exc).__name__}: {exc}")
            raise
        store.set(key, _HELD)
        yield lease
