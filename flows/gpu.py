"""GPU stages: a tag for the UI and tag limits, and one machine-wide slot so two GPU jobs never share a machine.

A GPU stage's task body runs inside ``gpu_slot()``: it holds one slot of the Prefect global concurrency limit
``dcae15-gpu-<host>`` (created by ``deploy/apply.py --gpu-host <host>``, limit 1 by default). A second training or
sampling job on the same machine waits for the slot instead of sharing its GPUs. The slot is a lease that Prefect
renews while the job lives, so a job killed with SIGKILL frees it when the lease runs out (``LEASE_SECONDS``).

Asked-for sharing: ``DCAE15_GPU_SHARE=1`` in the worker's environment skips the slot, and a limit that does not
exist (a laptop, the tests) limits nothing. Kubernetes pools do not need it: a pod owns its GPUs
(deploy/gpu-work-pool.yaml).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Any, Callable, Iterator

__all__ = ["GPU_TAG", "LEASE_SECONDS", "gpu_limit_name", "gpu_slot", "gpu_stage"]

GPU_TAG = "gpu"
LEASE_SECONDS = 300.0


def gpu_limit_name(host: str | None = None) -> str:
    """The global concurrency limit that guards one machine's GPUs: ``dcae15-gpu-<host>``."""
    host = (host or socket.gethostname()).split(".")[0].lower()
    return f"dcae15-gpu-{host}"


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold this machine's GPU slot for the body (no-op when sharing is asked for or no limit exists)."""
    if os.environ.get("DCAE15_GPU_SHARE", "").lower() in ("1", "true", "yes") or not _limit_exists(gpu_limit_name()):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(gpu_limit_name(), occupy=1, lease_duration=LEASE_SECONDS, strict=False):
        yield


def _limit_exists(name: str) -> bool:
    """Whether the limit was declared (a missing one would make Prefect warn on every GPU task of a laptop run)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return False
    return True


def gpu_stage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a GPU task body so that it runs inside :func:`gpu_slot` (put it under ``@task(tags=[GPU_TAG])``),
    unless its ``launch`` names a job slot (flows/slots.py): concurrent jobs on disjoint GPUs, under the one
    machine slot that the pipeline holds for all of them."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if (kwargs.get("launch") or {}).get("slot") is not None:
            return fn(*args, **kwargs)  # a job slot's share of the GPUs: the pipeline holds the machine's slot
        with gpu_slot():
            return fn(*args, **kwargs)

    return guarded
