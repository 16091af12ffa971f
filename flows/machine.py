"""Sharing one machine between jobs: its GPU slot (which jobs may use the machine's GPUs now) and its job slots
(how concurrent jobs of one pipeline split the machine's cores and GPUs).

This module schedules work; it decides nothing about who writes an artifact (that is the artifact's lease,
``storage.lease``, the only claim mechanism).

**The machine's GPU slot.** A GPU stage's task body (training, sampling) runs inside ``gpu_slot()``: it holds one
slot of the Prefect global concurrency limit ``dcae15-gpu-<host>``, so a second GPU job on the same machine waits
for the slot instead of sharing its GPUs. The limit is created once, by the operator (``deploy/apply.py --gpu-host
<host>``, limit 1 by default), never by a job, so no two jobs race to create it; a limit that does not exist (a
laptop, the tests, two ``dcae15`` commands on temporary Prefect servers) limits nothing and costs one read. The slot
is a Prefect lease renewed while the job lives; a job killed with SIGKILL frees it when that lease runs out
(``LEASE_SECONDS``, then Prefect's repossessor). A process holds the slot once: a GPU stage inside a flow run that
holds it already (the pipeline's concurrent jobs and the checkpoints it samples meanwhile) shares it.
``DCAE15_GPU_SHARE=1`` in the worker's environment skips the slot. Kubernetes pools do not need it: a pod owns its
GPUs (deploy/gpu-work-pool.yaml). GPU task bodies are tagged ``GPU_TAG`` (``@task(tags=[GPU_TAG])``), which a
Prefect tag limit (``deploy/apply.py --gpu-tag-limit``) can cap across machines.

**Job slots.** ``machine_slots(n)`` splits the cores this process may use (its CPU affinity) and the GPUs it sees
(``CUDA_VISIBLE_DEVICES``) into ``n`` slots. A job launched in a slot (``slot_launch``) runs under torchrun with one
process per GPU of its slot (one on a CPU machine), sees only its slot's GPUs and is pinned to its slot's cores
(``flows.launch.run_streaming``). Two backbones on one 8-GPU node: 2 slots of 4 GPUs (and half the cores) each.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["GPU_TAG", "LEASE_SECONDS", "gpu_limit_name", "gpu_slot",
           "Slot", "auto_concurrency", "machine_slots", "slot_launch"]

GPU_TAG = "gpu"
LEASE_SECONDS = 300.0


# ------------------------------------------------------------------------------------------------ the GPU slot
def gpu_limit_name(host: str | None = None) -> str:
    """The global concurrency limit that guards one machine's GPUs: ``dcae15-gpu-<host>``."""
    host = (host or socket.gethostname()).split(".")[0].lower()
    return f"dcae15-gpu-{host}"


_GPU_LOCK = threading.Lock()
_gpu_depth = 0  # GPU stages of this process inside the slot (the slot itself is taken by the first)


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold this machine's GPU slot for the body (no-op when sharing is asked for, no limit exists, or this process
    holds it already)."""
    global _gpu_depth
    with _GPU_LOCK:
        _gpu_depth += 1
        outer = _gpu_depth == 1
    try:
        if not outer or os.environ.get("DCAE15_GPU_SHARE", "").lower() in ("1", "true", "yes") \
                or not _limit_exists(gpu_limit_name()):
            yield
            return
        from prefect.concurrency.sync import concurrency

        with concurrency(gpu_limit_name(), occupy=1, lease_duration=LEASE_SECONDS, strict=False):
            yield
    finally:
        with _GPU_LOCK:
            _gpu_depth -= 1


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


# ------------------------------------------------------------------------------------------------ job slots
@dataclass(frozen=True)
class Slot:
    """One job's share of the machine: ``cpus`` (core ids for CPU affinity), ``gpus`` (``CUDA_VISIBLE_DEVICES``
    entries; empty on a machine without GPUs)."""

    index: int
    cpus: tuple[int, ...]
    gpus: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Slot":
        """From ``dataclasses.asdict`` (a flow parameter: lists, not tuples)."""
        return cls(int(d["index"]), tuple(int(c) for c in d["cpus"]), tuple(str(g) for g in d.get("gpus", ())))

    def env(self) -> dict[str, str]:
        """The job's environment: its GPUs only, and as many OpenMP threads as it has cores."""
        out = {"OMP_NUM_THREADS": str(len(self.cpus))}
        if self.gpus:
            out["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return out


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # macOS / Windows: no affinity API, the cores by number


def machine_slots(n: int, *, cpus: list[int] | None = None, gpus: list[str] | None = None) -> list[Slot]:
    """``n`` disjoint slots of this machine (``cpus`` / ``gpus`` default to what this process may use).

    Raises:
        ValueError: ``n`` < 1, more slots than cores, or GPUs that ``n`` does not divide (jobs of unequal size).
    """
    if n < 1:
        raise ValueError(f"concurrency={n} must be >= 1")
    if gpus is None:
        from dcae15.ae.encode import visible_gpus

        gpus = visible_gpus()
    cpus = _usable_cpus() if cpus is None else list(cpus)
    if n > len(cpus):
        raise ValueError(f"concurrency={n} but this process may use {len(cpus)} cores: at most one job per core; "
                         f"lower diffusion.concurrency")
    if gpus and len(gpus) % n:
        raise ValueError(f"concurrency={n} does not divide the {len(gpus)} visible GPUs ({','.join(gpus)}): every "
                         f"job gets the same number of GPUs; set diffusion.concurrency to a divisor or "
                         f"CUDA_VISIBLE_DEVICES")
    per_cpu, per_gpu = len(cpus) // n, len(gpus) // n
    return [Slot(i, tuple(cpus[i * per_cpu:(i + 1) * per_cpu]), tuple(gpus[i * per_gpu:(i + 1) * per_gpu]))
            for i in range(n)]


def auto_concurrency(jobs: int, *, cpus: list[int] | None = None, gpus: list[str] | None = None) -> int:
    """How many of ``jobs`` to run at once: the most, up to ``jobs``, that splits the visible GPUs evenly (on a GPU
    machine) or gives each job a core of its own (without GPUs)."""
    if gpus is None:
        from dcae15.ae.encode import visible_gpus

        gpus = visible_gpus()
    if gpus:
        return max(n for n in range(1, min(jobs, len(gpus)) + 1) if len(gpus) % n == 0)
    return max(1, min(jobs, len(_usable_cpus() if cpus is None else cpus)))


def slot_launch(launch: dict[str, Any], slot: Slot) -> dict[str, Any]:
    """A stage's ``launch`` dict for a job in ``slot``: torchrun, one process per slot GPU (one without GPUs), on
    one node (a slot is a share of one machine; the config refuses ``nnodes`` > 1 with concurrency), with the
    slot's environment and cores."""
    return {**launch, "launcher": "torchrun", "nproc_per_node": max(1, len(slot.gpus)), "nnodes": 1, "env": slot.env(),
            "cpus": list(slot.cpus), "slot": slot.index}
