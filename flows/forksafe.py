"""Make processes forked from a Prefect client exit cleanly (DataLoader workers forked inside a flow run).

The bug this fixes (Prefect 3.8, Python 3.11): Prefect's queue services (the log, event and result-record workers)
register a ``threading._register_atexit`` hook when they start, and an ``os.register_at_fork`` handler resets
their state in a forked child (``_done_event = None``) without removing that hook. A ``multiprocessing`` child
(fork start method: every torch DataLoader worker on Linux) runs the threading atexit hooks in ``_bootstrap``'s
``finally`` block; the inherited hook then calls ``drain()``, which fails ``assert self._done_event is not None``.
The AssertionError escapes ``_bootstrap`` from that ``finally`` block, so the child skips the traceback print and
leaves with ``os._exit(1)``: "DataLoader worker exited unexpectedly with exit code 1", no traceback.

The fix completes Prefect's own after-fork reset: in the child, every service that was reset for the fork gets an
already-set ``_done_event``, i.e. "nothing of this process left to drain", which is true (the child never started
it). Prefect's fork handler is registered when its services module is imported, ours after it, and CPython runs
after-fork-in-child handlers in registration order.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["install"]

_installed = False


def _mark_inherited_services_drained() -> None:
    try:
        from prefect._internal.concurrency import services
    except Exception:  # noqa: BLE001 - a Prefect without this module has nothing to fix
        return
    for service in list(getattr(services, "_active_services", ())):
        if getattr(service, "_done_event", object()) is None:  # reset for the fork by Prefect's own handler
            done = asyncio.Event()
            done.set()
            service._done_event = done


def install() -> None:
    """Register the after-fork fix once per process (idempotent; called when a flow module is imported)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    import prefect._internal.concurrency.services  # noqa: F401 - Prefect's reset must be registered before ours

    os.register_at_fork(after_in_child=_mark_inherited_services_drained)
    _installed = True
