"""Parallelism applied to any backbone: activation checkpointing, torch.compile, FSDP2 (per block, then root)."""

from __future__ import annotations

import os

import torch
from torch import nn

from dcae15.accel import compile_backend, gpu_branches

__all__ = ["apply_parallelism", "check_placement", "checkpoint_block", "default_device", "forward_inputs_seen",
           "local_device", "make_mesh", "misplaced", "mixed_precision_policy", "place"]


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


# ------------------------------------------------------------------------------------------------ placement
# The one placement rule, for every entry point (trainers, sampling, encoding, evaluation, bench, the GPU check):
# a module is built on the host with the run's seed (so its initial weights are the same on every rank and on
# every kind of device), then ``place(module, device)`` moves it before anything else touches it (an optimizer,
# an EMA copy, FSDP2, a forward). ``check_placement`` is the guard the trainers run after set-up and on their
# first batch: on a CPU the weights sit where the batch is whether or not they were moved, so only a check of
# where each tensor *is* against where it *should be* catches a missing move before a GPU does.
def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``module``'s parameters and buffers to ``device`` (in place) and return it."""
    return module.to(torch.device(device))


def _same_device(t: torch.Tensor, device: torch.device) -> bool:
    d = t.device
    if hasattr(t, "device_mesh") and hasattr(t, "to_local"):  # a DTensor: its local shard is what computes
        d = t.to_local().device
    return d.type == device.type and (device.index is None or d.index is None or d.index == device.index)


def _named_tensors(name: str, obj) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, nn.Module):
        return [(f"{name}.{n}", t) for n, t in [*obj.named_parameters(), *obj.named_buffers()]]
    if isinstance(obj, torch.optim.Optimizer):
        return [(f"{name}.state[{i}].{k}", v) for i, st in enumerate(obj.state.values())
                for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0]  # 0-d `step` may be CPU
    if isinstance(obj, dict):
        return [pair for k, v in obj.items() for pair in _named_tensors(f"{name}.{k}", v)]
    if isinstance(obj, (list, tuple)):
        return [pair for i, v in enumerate(obj) for pair in _named_tensors(f"{name}[{i}]", v)]
    return []


def misplaced(device: torch.device | str, **things) -> list[str]:
    """'name (device)' of every tensor in ``things`` (modules: parameters and buffers; optimizers: their state;
    dicts / lists / tensors) that does not sit on ``device``."""
    device = torch.device(device)
    return [f"{n} ({t.device})" for key, obj in things.items() for n, t in _named_tensors(key, obj)
            if not _same_device(t, device)]


def check_placement(device: torch.device | str, **things) -> None:
    """Raise if any tensor in ``things`` is not on ``device`` (see ``misplaced``).

    Raises:
        RuntimeError: naming the first misplaced tensors and how many there are.
    """
    bad = misplaced(device, **things)
    if bad:
        raise RuntimeError(f"{len(bad)} tensor(s) are not on {torch.device(device)}: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}. Every model must go through "
                           "dcae15.parallel.place(module, device) before its optimizer, EMA or first forward.")


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


def mixed_precision_policy(device: torch.device, mixed_precision: str, *, root: bool = False):
    """bf16 params / fp32 gradient reduction ('bf16') where the GPU branches are taken (``dcae15.accel``); plain
    fp32 everywhere else.

    ``root=True`` gives the root module's policy: it does not cast the forward inputs. FSDP2's root hook would
    otherwise turn the float timesteps into bf16 before the model embeds them (t = 997 -> 996, 999 -> 1000: a grid
    of 4 above 512); the model casts its image input to its parameters' dtype itself, and each block still casts
    its (already bf16) inputs.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision not in ("bf16", "fp32"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; allowed: ('bf16', 'fp32')")
    if mixed_precision == "bf16" and gpu_branches(device):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=not root)
    return MixedPrecisionPolicy()  # CPU: bf16 matmuls are slow and gloo reduces fp32 anyway


def checkpoint_block(block: nn.Module) -> nn.Module:
    """Recompute ``block``'s activations in the backward pass, in place: its forward runs inside a non-reentrant
    ``torch.utils.checkpoint`` (what torchtitan's ``checkpoint_wrapper`` does), which ``torch.compile`` traces into
    the block's graph; unlike a wrapper module, parameter names (and so checkpoints and EMA keys) do not change."""
    from torch.utils.checkpoint import checkpoint

    if getattr(block, "_dcae15_checkpointed", False):
        return block
    inner = block.forward  # the bound method of the class

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward
    block._dcae15_checkpointed = True
    return block


def apply_parallelism(model: nn.Module, *, mesh, device: torch.device, mixed_precision: str = "bf16",
                      activation_checkpointing: bool = False, compile: bool = False, shard: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2 in place and return it (``shard=False``: checkpointing and compile only).

    Order (torchtitan): activation checkpointing of each block -> ``torch.compile`` of each block with
    ``fullgraph=True`` (a graph break inside a block is an error, not a silent slowdown) -> ``fully_shard`` each
    block -> ``fully_shard`` root. All three keep parameter names unchanged (``checkpoint_block``, in-place
    ``Module.compile``), so checkpoints load into an unsharded model for sampling. FSDP2's hooks stay outside the
    compiled graphs (dynamo skips them).

    Args:
        model: a backbone, optionally exposing ``blocks_to_shard`` (its transformer blocks); without it FSDP2
            wraps the whole module as one unit and there are no blocks to checkpoint or compile.
        mesh: a 1-D ``DeviceMesh`` over all ranks (FSDP) or a 2-D ``(replicate, shard)`` one (HSDP), see
            ``make_mesh``.
        device: where the parameters live: ``place`` moves the model there first (FSDP2 keeps it there).
        mixed_precision: 'bf16' (bf16 params, fp32 reduce; GPU branches only) or 'fp32'.
        activation_checkpointing: recompute each block's activations in the backward pass.
        compile: ``torch.compile`` each block (backend ``dcae15.accel.compile_backend()``).
        shard: wrap with FSDP2. False leaves plain parameters (one rank: FSDP2's per-block hooks cost more than
            a small model's compute, bench/RESULTS.md); ``mesh`` and ``mixed_precision`` are then unused (the
            trainer autocasts a bf16 run instead).
    """
    from torch.distributed.fsdp import fully_shard

    place(model, device)  # the placement rule: FSDP2 would move a sharded model, nothing moves a plain one
    blocks = list(getattr(model, "blocks_to_shard", ()))  # none (a plug-in without it): the root is the one unit
    if activation_checkpointing:
        for blk in blocks:
            checkpoint_block(blk)
    if compile:
        backend = compile_backend()
        for blk in blocks:
            # static shapes: the trainer's batch never changes, and a dynamic graph is slower and compiles twice
            blk.compile(fullgraph=True, dynamic=False, backend=backend)
    if not shard:
        return model
    mp = mixed_precision_policy(device, mixed_precision)
    for i, blk in enumerate(blocks):
        # The last block's params are needed right away in backward: keep them gathered after forward.
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision_policy(device, mixed_precision, root=True))
    return model


@torch.no_grad()
def forward_inputs_seen(model: nn.Module, *args) -> tuple:
    """Run ``model(*args)`` once and return the positional inputs its ``forward`` received, after every forward
    pre-hook (FSDP2's casts included): what a sharded model really computes with (``bench/gpu_check.py``, tests)."""
    seen: list = []
    handle = model.register_forward_pre_hook(lambda _m, a: seen.append(tuple(a)))  # runs after FSDP2's (prepended)
    try:
        model(*args)
    finally:
        handle.remove()
    return seen[0]
