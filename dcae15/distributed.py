"""Process groups for the trainers and the sampler, in torchtitan's order: ``torch.cuda.set_device`` ->
``init_process_group(backend, device_id=..., timeout=...)``; plus a gloo side group for waits behind I/O.

The decision (backend, device, rendezvous) is the pure function ``plan_process_group``, tested on CPU with the
answers a CUDA machine gets; ``init_distributed`` only carries it out.

Timeouts (seconds, environment): ``DCAE15_PG_TIMEOUT_S`` for the compute group (default 1800: NCCL's default
600 s is shorter than a DiT-XL DCP save to object storage), ``DCAE15_IO_TIMEOUT_S`` for the gloo I/O group (default
7200: rank 0 writing an ~8 GB AE checkpoint, a sampling barrier behind USiT-3B / dopri5 units).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["PG_TIMEOUT_ENV", "IO_TIMEOUT_ENV", "GroupPlan", "plan_process_group", "group_timeout",
           "init_distributed", "new_io_group", "io_barrier"]

PG_TIMEOUT_ENV = "DCAE15_PG_TIMEOUT_S"
IO_TIMEOUT_ENV = "DCAE15_IO_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = {PG_TIMEOUT_ENV: 1800.0, IO_TIMEOUT_ENV: 7200.0}


@dataclass(frozen=True)
class GroupPlan:
    """How this process joins (or makes) its process group."""

    backend: str
    """'gloo' on CPU; 'cpu:gloo,cuda:nccl' with a GPU (CUDA tensors on NCCL, CPU tensors on gloo), also for one
    process, whose tensors live on the GPU."""
    device: str
    """'cpu' or 'cuda:<local rank>': made current before ``init_process_group`` and passed as its device_id."""
    rank: int
    world_size: int
    torchrun: bool
    """True: torchrun's env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR...); False: one process, in-memory store."""

    @property
    def device_id(self) -> torch.device | None:
        """``init_process_group``'s device_id: binds NCCL to this GPU at once (eager init); None on CPU."""
        return torch.device(self.device) if self.device.startswith("cuda") else None


def plan_process_group(env: Mapping[str, str], cuda_devices: int, *, use_cuda: bool = True) -> GroupPlan:
    """The process group a process with environment ``env`` and ``cuda_devices`` visible GPUs should make.

    Args:
        env: the environment (``os.environ``): RANK / WORLD_SIZE (torchrun), LOCAL_RANK.
        cuda_devices: ``torch.cuda.device_count()`` (0 without CUDA).
        use_cuda: False when the caller was asked to run on the CPU.

    Raises:
        ValueError: LOCAL_RANK names a GPU that is not visible, or malformed RANK / WORLD_SIZE.
    """
    torchrun = "RANK" in env and "WORLD_SIZE" in env
    try:
        rank = int(env["RANK"]) if torchrun else 0
        world = int(env["WORLD_SIZE"]) if torchrun else 1
        local = int(env.get("LOCAL_RANK", rank % cuda_devices if cuda_devices else 0))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (torchrun sets them): {e}") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if not (use_cuda and cuda_devices > 0):
        return GroupPlan("gloo", "cpu", rank, world, torchrun)
    if not 0 <= local < cuda_devices:
        raise ValueError(f"LOCAL_RANK={local} but only {cuda_devices} GPU(s) are visible: start at most "
                         f"{cuda_devices} processes per node (torchrun --nproc_per_node) or fix CUDA_VISIBLE_DEVICES")
    return GroupPlan("cpu:gloo,cuda:nccl", f"cuda:{local}", rank, world, torchrun)


def group_timeout(name: str = PG_TIMEOUT_ENV, env: Mapping[str, str] | None = None) -> timedelta:
    """The timeout ``name`` (PG_TIMEOUT_ENV or IO_TIMEOUT_ENV) sets, in seconds, or its default.

    Raises:
        ValueError: not a positive number.
    """
    env = os.environ if env is None else env
    raw = env.get(name, "").strip()
    try:
        secs = float(raw) if raw else _DEFAULT_TIMEOUT_S[name]
    except ValueError:
        secs = -1.0
    if not secs > 0:
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=secs)


def init_distributed(*, use_cuda: bool = True, single_process_group: bool = True
                     ) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, created): join torchrun's group, reuse a live one, or make a one-process group.

    Order: the GPU is made current first, then the group is made with ``device_id`` (NCCL binds to it at once) and
    the ``DCAE15_PG_TIMEOUT_S`` timeout. ``single_process_group=False``: without torchrun (or at world size 1) no
    group is made and (0, 1, device, False) is returned.
    """
    cuda = torch.cuda.device_count() if use_cuda and torch.cuda.is_available() else 0
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        plan = plan_process_group({**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world)}, cuda,
                                  use_cuda=use_cuda)
        if plan.device_id is not None:
            torch.cuda.set_device(plan.device_id)
        return rank, world, torch.device(plan.device), False
    plan = plan_process_group(os.environ, cuda, use_cuda=use_cuda)
    if plan.device_id is not None:
        torch.cuda.set_device(plan.device_id)  # before the group: NCCL's communicator must land on this GPU
    if not single_process_group and plan.world_size == 1:
        return 0, 1, torch.device(plan.device), False
    kw: dict = {"backend": plan.backend, "timeout": group_timeout(PG_TIMEOUT_ENV), "device_id": plan.device_id}
    if not plan.torchrun:  # one process: still a process group, so the code path is the one torchrun runs
        kw.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(**kw)
    return dist.get_rank(), dist.get_world_size(), torch.device(plan.device), True


def new_io_group():
    """A gloo group over all ranks for waits behind I/O (a rank saving, a sampling barrier), with the
    ``DCAE15_IO_TIMEOUT_S`` timeout: a long wait there neither trips NCCL's watchdog nor holds a GPU stream.
    Collective: every rank calls it at the same point. The caller destroys it (``dist.destroy_process_group``)."""
    return dist.new_group(backend="gloo", timeout=group_timeout(IO_TIMEOUT_ENV))


def io_barrier(group) -> None:
    """Barrier on the I/O group (``new_io_group``); a no-op without a process group."""
    if group is not None and dist.is_initialized():
        dist.barrier(group=group)
