"""Dask clients for packing and encoding: a scheduler address, a LocalCluster, or one pinned worker per device."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

__all__ = ["dask_client", "device_worker_envs", "local_device_cluster"]


def device_worker_envs(devices: list[str], *, extra: dict[str, str] | None = None) -> list[dict[str, str]]:
    """One environment per worker, worker ``i`` seeing only ``devices[i]`` (``CUDA_VISIBLE_DEVICES``).

    A worker that sees exactly one GPU uses it as ``cuda:0``: this is how dask-cuda pins workers, and what
    ``dask cuda worker`` / ``CUDA_VISIBLE_DEVICES=i dask worker ...`` do on a real cluster.

    Raises:
        ValueError: no devices, or a device listed twice (two workers on one GPU would hold two AE copies).
    """
    devices = [str(d).strip() for d in devices]
    if not devices or any(not d for d in devices):
        raise ValueError(f"devices must be a non-empty list of GPU ids or UUIDs, got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices {devices!r} lists a GPU twice: one worker per GPU")
    return [{**(extra or {}), "CUDA_VISIBLE_DEVICES": d} for d in devices]


def local_device_cluster(envs: list[dict[str, str]], *, threads_per_worker: int = 1):
    """A local Dask cluster with one worker process per entry of ``envs`` (each started with that environment).

    Uses dask-cuda's ``LocalCUDACluster`` when it is installed (it pins workers the same way and adds NVML-aware
    placement); otherwise a ``SpecCluster`` of ``Nanny`` workers, each with its own ``CUDA_VISIBLE_DEVICES``
    (dask-cuda does not install next to this project's pinned dask here, see docs/imagenet.md).
    """
    from distributed import Nanny, Scheduler, SpecCluster

    devices = [e.get("CUDA_VISIBLE_DEVICES") for e in envs]
    try:
        from dask_cuda import LocalCUDACluster  # optional: only where it installs next to our dask
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None and all(devices):
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), threads_per_worker=threads_per_worker,
                                dashboard_address=None, host="127.0.0.1")
    workers = {f"worker-{i}": {"cls": Nanny, "options": {"nthreads": threads_per_worker, "env": dict(env),
                                                          "host": "127.0.0.1", "name": f"worker-{i}"}}
               for i, env in enumerate(envs)}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="dcae15-devices")


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int = 1, *, processes: bool = True,
                worker_envs: list[dict[str, str]] | None = None) -> Iterator[Any]:
    """A Dask client on ``scheduler`` (a running cluster), or on a local cluster started (and stopped) here.

    Args:
        scheduler: address of a running scheduler (``tcp://host:8786``); its workers are used as they are.
        workers: LocalCluster worker count (ignored with ``scheduler`` or ``worker_envs``).
        processes: LocalCluster with processes (True) or threads in this process (False).
        worker_envs: start one worker process per entry with that environment (GPU pinning).
    """
    import dask
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would drown the caller's log
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    if not worker_envs and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's mmap threshold: every large torch
    # buffer freed and reallocated per batch becomes a fresh mmap + page faults. Measured here: the same CPU
    # forward ran 1.5-2.5x slower in such a worker than in the driver, and as fast once it is unset.
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
        del os.environ["MALLOC_TRIM_THRESHOLD_"]  # leaked into this process by an earlier Dask nanny; children inherit it
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        if worker_envs:
            cluster = local_device_cluster(worker_envs)
        else:
            # one thread per worker: torch in each worker process uses one core and workers scale across cores;
            # worker processes talk over TCP on loopback only; threads use Dask's in-process transport
            net = {"host": "127.0.0.1"} if processes else {}
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                                   dashboard_address=None, **net)
    with cluster, Client(cluster) as client:
        yield client
