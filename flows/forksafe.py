"""Make every process forked from a Prefect client exit cleanly (Dask or DataLoader workers forked in a flow run).

The bug and the fix are described in ``storage/forksafe.py``, which the library's own DataLoader workers apply
from inside (without importing Prefect). Here the same fix is registered as an after-fork handler of the flow
process, so that any forked child — also one whose code is not the library's — leaves cleanly. Prefect's fork
handler is registered when its services module is imported, ours after it, and CPython runs after-fork-in-child
handlers in registration order.
"""

from __future__ import annotations

import os

__all__ = ["install"]

_installed = False


def install() -> None:
    """Register the after-fork fix once per process (idempotent; called when a flow module is imported)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    import prefect._internal.concurrency.services  # noqa: F401 - Prefect's reset must be registered before ours

    from storage.forksafe import mark_inherited_services_drained

    os.register_at_fork(after_in_child=mark_inherited_services_drained)
    _installed = True
