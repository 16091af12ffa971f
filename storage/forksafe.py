"""Forked workers of a process that has Prefect loaded must not die at exit — without importing Prefect here.

The bug (Prefect 3.8, Python 3.11): Prefect's queue services (log, event and result-record workers) register a
``threading._register_atexit`` hook when they start, and an ``os.register_at_fork`` handler resets them in a forked
child (``_done_event = None``) without removing that hook. A ``multiprocessing`` child (fork start method: every
torch DataLoader worker on Linux) runs the threading atexit hooks in ``_bootstrap``'s ``finally`` block; the
inherited hook calls ``drain()``, which fails ``assert self._done_event is not None``. The AssertionError escapes
from that ``finally`` block, so the child skips the traceback print and leaves with ``os._exit(1)``: "DataLoader
worker (pid …) exited unexpectedly with exit code 1", no traceback. Any process that ran a Prefect flow has
started those services: a user's own ``@flow`` followed by the project's reader is enough (docs/forksafe.md).

The fix completes Prefect's after-fork reset: in the child, every service that was reset for the fork gets an
already-set ``_done_event``, i.e. "nothing of this process left to drain", which is true (the child never started
it). :func:`in_worker` applies it from inside the library's worker code (the reader's ``__iter__``, the AE data's
``__getitem__``, the reference statistics' ``worker_init_fn``), so it also holds for a DataLoader the user built;
it reads Prefect only from ``sys.modules`` and does nothing where Prefect is not loaded.
"""

from __future__ import annotations

import asyncio
import os
import sys

__all__ = ["mark_inherited_services_drained", "in_worker"]

_SERVICES = "prefect._internal.concurrency.services"
_fixed_in: int | None = None  # the pid the fix was applied in (once per worker process)


def mark_inherited_services_drained() -> None:
    """In a forked child: mark Prefect's services that were reset for the fork as drained (no-op without Prefect)."""
    services = sys.modules.get(_SERVICES)
    if services is None:
        return
    for service in list(getattr(services, "_active_services", ())):
        reset = getattr(service, "_stopped", False) and not getattr(service, "_started", True)
        if reset and getattr(service, "_done_event", object()) is None:  # reset by Prefect's own fork handler
            done = asyncio.Event()
            done.set()
            service._done_event = done


def in_worker() -> None:
    """Call first thing in code that runs inside a DataLoader worker: applies the fix once per forked process."""
    global _fixed_in
    if _fixed_in == os.getpid():
        return
    _fixed_in = os.getpid()
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None:  # a worker process, not the main one iterating without workers
        mark_inherited_services_drained()
