"""Parallelism applied to any backbone: activation checkpointing, torch.compile, FSDP2 (per block, then root)."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["apply_parallelism", "autocast", "default_device", "local_device", "make_mesh", "mixed_precision_policy"]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; None or "auto": the GPU when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def local_device(rank: int) -> torch.device:
    """This process's device: the GPU of its LOCAL_RANK (torchrun) or ``rank % GPUs``, made current; else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def make_mesh(device: torch.device, world_size: int, shard_size: int | None = None):
    """The device mesh FSDP2 shards over: 1-D over all ranks (FSDP), or 2-D ``(replicate, shard)`` for HSDP.

    With ``shard_size`` s < world size, parameters are sharded within groups of s consecutive ranks (one node's
    GPUs: the reduce-scatter stays on NVLink) and replicated across the ``world_size / s`` groups (one
    all-reduce of the shards across nodes per step).

    Raises:
        ValueError: ``shard_size`` does not divide the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size is None or int(shard_size) == world_size:
        return init_device_mesh(device.type, (world_size,))
    s = int(shard_size)
    if s < 1 or world_size % s:
        raise ValueError(f"hsdp_shard_size={shard_size} must divide the world size {world_size}")
    return init_device_mesh(device.type, (world_size // s, s), mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(device: torch.device, mixed_precision: str):
    """bf16 params / fp32 gradient reduction on GPU ('bf16'); plain fp32 everywhere else."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision not in ("bf16", "fp32"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; allowed: ('bf16', 'fp32')")
    if mixed_precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # CPU: bf16 matmuls are slow and gloo reduces fp32 anyway


def apply_parallelism(model: nn.Module, *, mesh, device: torch.device, mixed_precision: str = "bf16",
                      activation_checkpointing: bool = False, compile: bool = False, shard: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2 in place and return it (``shard=False``: checkpointing and compile only).

    Order (torchtitan): activation checkpointing -> compile -> ``fully_shard`` each block -> ``fully_shard`` root.
    All three keep parameter names unchanged (composable checkpoint, in-place ``Module.compile``), so checkpoints
    load into an unsharded model for sampling.

    Args:
        model: a backbone exposing ``blocks_to_shard`` (its transformer blocks).
        mesh: a 1-D ``DeviceMesh`` over all ranks (FSDP) or a 2-D ``(replicate, shard)`` one (HSDP), see
            ``make_mesh``.
        device: where the parameters live.
        mixed_precision: 'bf16' (bf16 params, fp32 reduce; GPU only) or 'fp32'.
        activation_checkpointing: recompute each block's activations in the backward pass.
        compile: ``torch.compile`` each block.
        shard: wrap with FSDP2. False leaves plain parameters (one rank: FSDP2's per-block hooks cost more than
            a small model's compute, bench/RESULTS.md); ``mesh`` and ``mixed_precision`` are then unused and a
            bf16 run autocasts instead (``autocast``).
    """
    from torch.distributed.fsdp import fully_shard

    blocks = list(model.blocks_to_shard)
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for blk in blocks:
            checkpoint(blk)
    if compile:
        for blk in blocks:
            blk.compile()
    if not shard:
        return model
    mp = mixed_precision_policy(device, mixed_precision)
    for i, blk in enumerate(blocks):
        # The last block's params are needed right away in backward: keep them gathered after forward.
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def autocast(device: torch.device, mixed_precision: str, sharded: bool):
    """The forward's autocast context: bf16 on GPU for an unsharded bf16 run (what FSDP2's policy does for a
    sharded one, whose forward then needs none); a no-op otherwise (CPU always runs fp32)."""
    import contextlib

    if not sharded and mixed_precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
