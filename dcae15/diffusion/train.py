"""Diffusion training on a latent store: FSDP2, ADT, EMA, DCP checkpoints with exact resume; torchrun entry."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dcae15.accel import bf16_autocast, gpu_branches
from dcae15.checkpointer import Checkpointer
from dcae15.diffusion.adt import ADTConfig, LossNorm, draw_mask, micro_loss
from dcae15.diffusion.checkpoint import dcp_reader, dcp_writer, open_run, quiet_single_process_load
from dcae15.diffusion.objectives import make_objective
from dcae15.ema import EMA, decay_at
from dcae15.lr_schedule import SCHEDULES, lr_at
from dcae15.models.plugin import is_import_path
from dcae15.models.registry import OBJECTIVES, build_model, check_backbone_name, model_config, preset
from dcae15.tracking import TrackingConfig, config_of, open_tracker
from dcae15.typed_config import above, at_least, between, check_declared, from_dict, one_of
from storage.fingerprint import fingerprint, short_id
from storage.layout import Root
from storage.lease import rank_zero_claim
from storage.rundir import HORIZON, OPERATIONAL, identity
from storage.urls import url_to_fs

__all__ = ["DiffusionTrainConfig", "NonFiniteLossError", "build_training_model", "train_diffusion", "run_id_for",
           "check_plugin", "node_shard_size", "store_info", "latest_checkpoint", "train_flops_per_image",
           "make_optimizer", "TrainStep",
           "main"]

@dataclass(kw_only=True)
class DiffusionTrainConfig:
    """One diffusion training run (the store supplies channels, latent size and the class count)."""

    model: str = "DiT-tiny"
    """Preset name (dcae15.models.PRESETS): DiT-XL, SiT-XL, UViT-H, USiT-H, UViT-2B, USiT-2B, USiT-3B, *-tiny; or
    a backbone by import path ``package.module:factory`` (docs/backbones.md)."""
    objective: str | None = field(default=None, metadata=one_of(*OBJECTIVES))
    """None = the preset's ('ddpm-linear' DiT, 'ddpm-scaled-linear' UViT, 'flow' SiT/USiT); required for an
    import-path backbone."""
    patch_size: int = field(default=1, metadata=at_least(1))
    model_overrides: dict = field(default_factory=dict)
    """Extra ModelConfig fields (e.g. {'hidden': 64, 'depth': 2}); for an import-path backbone, extra keyword
    arguments of its factory."""
    num_classes: int | None = None
    """None = from the store (attrs 'num_classes', else max label + 1)."""
    global_batch_size: int = field(default=32, metadata=at_least(1))
    steps: int = field(default=1000, metadata={**HORIZON, **at_least(1)})
    lr: float = field(default=1e-4, metadata=above(0))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=between(0, 1, hi_open=True, each=2))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    warmup_steps: int = field(default=0, metadata=at_least(0))
    """Linear lr warm-up from 0; then ``schedule``."""
    schedule: str = field(default="constant", metadata=one_of(*SCHEDULES))
    """After the warm-up: "constant" (the DiT / U-ViT recipes) or "cosine" (to 0 at ``steps``; ``steps`` is then
    part of the run's identity: a longer run is another run)."""
    grad_clip: float = field(default=1.0, metadata=at_least(0))
    """Max global grad norm; 0 = no clipping (the norm is still logged)."""
    ema_decay: float = field(default=0.9999, metadata=between(0, 1, hi_open=True))
    ema_warmup: bool = True
    """decay_t = min(ema_decay, (1 + t) / (10 + t)) so early EMA tracks the model."""
    ema_warmup_steps: int | None = field(default=None, metadata=at_least(1))
    """decay_t = ema_decay * (1 - exp(-t / ema_warmup_steps)) (efficientvit / DC-Gen's EMA, 2000 there); set, it
    replaces ``ema_warmup``."""
    ema_every: int = field(default=1, metadata=at_least(1))
    """Update the EMA every this many steps, with the decay raised to that power (ema-pytorch's ``update_every``):
    the update is a pass over every parameter whose cost does not shrink with the batch (15 % of a one-rank CPU
    step at DiT-S width, batch 8; ~1 % of a GPU step at batch 256), so small-batch runs amortise it."""
    label_dropout: float = field(default=0.1, metadata=between(0, 1, hi_open=True))
    adt: ADTConfig = field(default_factory=ADTConfig)
    seed: int = 0
    normalize: str = field(default="scaling_factor", metadata=one_of("scaling_factor", "channel_stats", "none"))
    flip: bool = True
    shuffle_chunks: int = 4
    num_workers: int = field(default=0, metadata={**OPERATIONAL, **at_least(0)})
    prefetch_batches: int = field(default=2, metadata={**OPERATIONAL, **at_least(1)})
    """Batches fetched ahead by a background thread while the step runs (>= 1)."""
    grad_accum_steps: int = field(default=1, metadata={**OPERATIONAL, **at_least(1)})
    """Micro-batches per optimizer step: each rank's batch is split in this many forward/backward passes (same
    update as the whole batch up to fp rounding; gradients are reduced across ranks once, on the last one)."""
    hsdp_shard_size: int | None = field(default=None, metadata={**OPERATIONAL, **at_least(1)})
    """Ranks that shard the model (e.g. the GPUs of one node); the world is replicated across
    ``world_size / hsdp_shard_size`` such groups (HSDP, a 2-D mesh). None = HSDP across nodes when the job spans
    several (shard within a node: torchrun's LOCAL_WORLD_SIZE, replicate across nodes, so only one all-reduce of
    the shards per step crosses the inter-node network), else FSDP over all ranks."""
    async_checkpoint: bool = field(default=True, metadata=OPERATIONAL)
    """Save checkpoints in a background thread (DCP async_save) after staging them to CPU memory; ``latest``
    is written only once the save completed."""
    mixed_precision: str = field(default="bf16", metadata=one_of("bf16", "fp32"))
    """'bf16' (bf16 params, fp32 reduce, fp32 timesteps; on GPU, or on CPU under DCAE15_GPU_BRANCHES=1; else the CPU
    runs fp32) or 'fp32'."""
    fsdp_one_rank: bool = field(default=False, metadata=OPERATIONAL)
    """Wrap the model in FSDP2 at world size 1 too. Default False: one rank trains the plain module (FSDP2's
    per-block hooks cost about as much as a small model's compute there, bench/RESULTS.md; a bf16 run autocasts
    instead); the checkpoints are the same DCP format either way and resume across the two paths and world sizes."""
    activation_checkpointing: bool = field(default=False, metadata=OPERATIONAL)
    """Recompute each block's activations in backward (forced on by DCAE15_GPU_BRANCHES=1)."""
    compile: bool = field(default=False, metadata=OPERATIONAL)
    """torch.compile each block, fullgraph (forced on by DCAE15_GPU_BRANCHES=1)."""
    checkpoint_every: int = field(default=1000, metadata={**OPERATIONAL, **at_least(1)})
    keep_checkpoints: int = field(default=2, metadata={**OPERATIONAL, **at_least(0)})
    log_every: int = field(default=10, metadata={**OPERATIONAL, **at_least(1)})
    logging: TrackingConfig = field(default_factory=TrackingConfig, metadata=OPERATIONAL)
    """Mirror each logged row (loss, grad norm, lr, c', throughput) to TensorBoard / W&B / MLflow on rank 0
    (``dcae15.tracking``); ``metrics.jsonl`` is written either way."""
    peak_tflops: float | None = field(default=None, metadata=OPERATIONAL)
    """Accelerator peak for MFU; None = looked up for H100/H200/A100 (989/989/312 bf16 dense)."""
    progress: bool = field(default=True, metadata=OPERATIONAL)
    cpu_threads: int | None = field(default=1, metadata={**OPERATIONAL, **at_least(1)})
    """torch intra-op threads when training on CPU (None = torch's default). Tiny models step 10-40x slower with
    2 threads than with 1 on a busy 2-core machine (bench/RESULTS.md, diffusion section): small ops drown in
    thread synchronisation. Ignored on GPU."""

    def __post_init__(self) -> None:
        if isinstance(self.adt, dict):
            self.adt = ADTConfig(**self.adt)
        if isinstance(self.logging, dict):
            self.logging = TrackingConfig(**self.logging)
        self.betas = tuple(float(b) for b in self.betas)
        check_declared(self)  # the ranges and choices declared with the fields
        check_backbone_name(self.model, "DiffusionTrainConfig.model")  # unknown names fail here with the allowed set
        if is_import_path(self.model) and self.objective is None:
            raise ValueError(f"DiffusionTrainConfig.objective is required for the import-path backbone "
                             f"{self.model!r} (diffusion.train.objective); allowed: {OBJECTIVES}")
        if is_import_path(self.model) and self.patch_size != 1:
            raise ValueError(f"DiffusionTrainConfig.patch_size={self.patch_size} is a preset field; an import-path "
                             f"backbone ({self.model!r}) takes its patch size from model_overrides, if any")

    @property
    def objective_name(self) -> str:
        return self.objective or preset(self.model).objective

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "DiffusionTrainConfig":
        """Checked construction (unknown fields, types, ranges), errors naming ``path`` (``diffusion.train``)."""
        return from_dict(cls, d, path)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, YAML-safe

    def identity(self) -> dict:
        """The fields that decide what the run computes (``storage.rundir.identity``): neither the operational
        ones (logging, checkpoint cadence, workers, sharding, compile, ...) nor ``steps`` (the lr schedule does not
        depend on it, so a longer run continues the shorter one) unless the cosine schedule depends on it."""
        out = identity(self, self.to_dict(), keep_horizon=self.schedule == "cosine")
        if out["schedule"] == "constant":
            del out["schedule"]  # constant-lr runs keep the run ids they had before the field existed
        if out["ema_every"] == 1:
            del out["ema_every"]  # likewise
        if out["ema_warmup_steps"] is None:
            del out["ema_warmup_steps"]  # likewise
        else:
            del out["ema_warmup"]  # replaced by the exponential warm-up
        return out


class NonFiniteLossError(FloatingPointError):
    """Loss or gradient norm became NaN/inf (seen at the next log / checkpoint step); updates with a non-finite
    gradient were skipped on the device, no checkpoint was written since, and the last checkpoint is intact."""


# ------------------------------------------------------------------------------------------------ pure helpers
def _noise_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank's device generator (noise, timesteps, label dropout, c') when started at ``step``: its state
    is checkpointed, so it is reseeded only at the start of a run or when the world size changed."""
    return int(fingerprint(["diffusion-noise", seed, rank, step]), 16) % (2**63)


def store_info(store_url: str, storage_options: dict | None = None) -> dict:
    """What training needs from a latent store: store_id, latent shape, class count, AE pointer."""
    from storage.latent_store import LatentStore

    st = LatentStore.open(store_url, storage_options=storage_options, read_only=True)
    a = st.attrs
    c, h, w = st.latent_shape
    if a.get("num_classes") is not None:
        num_classes = int(a["num_classes"])
    else:
        labels = st.labels()[st.valid()]
        num_classes = int(labels.max()) + 1 if labels.size else 1
    sid = st.store_id  # recorded by the store at creation, never recomputed here
    complete = st.is_complete
    stats = st.statistics() if complete else {}
    return {"store_id": sid, "channels": c, "height": h, "width": w, "num_classes": num_classes,
            "ae_fingerprint": a["ae_fingerprint"], "ae_url": a.get("ae_url"), "is_complete": complete,
            "channel_choices": a.get("channel_choices"), "resolution": int(a["resolution"]),
            # what the reader's normalisation did, so sampling can undo it before decoding
            "scaling_factor": st.scaling_factor if complete else None,
            "channel_mean": stats.get("channel_mean"), "channel_std": stats.get("channel_std")}


def node_shard_size(world_size: int) -> int | None:
    """The default HSDP shard group: one node's processes (torchrun's ``LOCAL_WORLD_SIZE``) when the world spans
    several nodes; None (FSDP over all ranks) on one node or outside torchrun."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return local if 0 < local < world_size and world_size % local == 0 else None


def run_id_for(cfg: DiffusionTrainConfig, store_id: str) -> str:
    """Deterministic run id from the config's identity (``DiffusionTrainConfig.identity``) and the store; for an
    import-path backbone also the fingerprint of its module's source file (edited model code = a new run), the
    id then starts with the factory's name."""
    from dcae15.models.plugin import source_fingerprint

    if is_import_path(cfg.model):
        src = source_fingerprint(cfg.model)
        return f"{cfg.model.rpartition(':')[2]}-{short_id('diffusion-run', cfg.identity(), store_id, src)}"
    return f"{cfg.model}-{short_id('diffusion-run', cfg.identity(), store_id)}"


def _model_config(cfg: DiffusionTrainConfig, info: dict):
    """The model config of ``cfg`` on the store described by ``info`` (``store_info``)."""
    return model_config(cfg.model, in_channels=info["channels"], input_size=(info["height"], info["width"]),
                        patch_size=cfg.patch_size, num_classes=cfg.num_classes or info["num_classes"],
                        **cfg.model_overrides)


def check_plugin(cfg: DiffusionTrainConfig, info: dict) -> None:
    """For an import-path backbone: build it once on the CPU and run ``dcae15.models.check_backbone`` (one tiny
    forward), so a bad plug-in fails before any process group, run directory or data loader exists."""
    from dcae15.models.plugin import check_backbone

    if is_import_path(cfg.model):
        mcfg = _model_config(cfg, info)
        torch.manual_seed(cfg.seed)
        check_backbone(build_model(mcfg), mcfg)


def _flops_per_image(mcfg, tokens: int, params: int, passes: int) -> float:
    """Rule-of-thumb training FLOPs per image: 6 N T (all parameters as per-token matmuls) + 12 L T^2 D for
    attention, x passes. It overcounts adaLN / embedding parameters, which act once per image: MFU uses
    ``train_flops_per_image`` (counted); this stays as the cross-check printed by bench/train_step.py."""
    blocks = mcfg.depth + (1 if mcfg.arch == "uvit" else 0)
    t = tokens + (2 if mcfg.arch == "uvit" else 0)
    return passes * (6.0 * params * t + 12.0 * blocks * t * t * mcfg.hidden)


def train_flops_per_image(mcfg, batch: int, passes: int = 1) -> float:
    """Forward + backward FLOPs per image counted by ``torch.utils.flop_counter`` on a meta-device copy of the
    model (no memory, no compute) at the real micro-batch (``passes`` = 2 when ADT adds the full objective)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, (h, w) = mcfg.in_channels, mcfg.input_size
    n = batch * passes
    try:
        with torch.device("meta"):
            model = build_model(mcfg)
            x, t = torch.randn(n, c, h, w), torch.full((n,), 500.0)
            y = torch.zeros(n, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, y).float().square().mean().backward()
    except Exception:  # noqa: BLE001 - a plug-in whose forward needs real data (e.g. .item()): no MFU, no failure
        if getattr(mcfg, "arch", None) != "plugin":
            raise
        return float("nan")
    return counter.get_total_flops() / batch


def _peak_flops(cfg: DiffusionTrainConfig, device: torch.device) -> float | None:
    from dcae15.accel import dense_bf16_peak_flops

    return cfg.peak_tflops * 1e12 if cfg.peak_tflops else dense_bf16_peak_flops(device)


def build_training_model(cfg: DiffusionTrainConfig, mcfg, device: torch.device, world_size: int
                         ) -> tuple[torch.nn.Module, bool]:
    """(model, sharded): the backbone built with the run's seed (identical weights on every rank), placed on
    ``device`` and parallelised as the trainer runs it — FSDP2 when ``world_size > 1`` or ``fsdp_one_rank``,
    else the plain module (one rank); checkpointing and compile per config or ``DCAE15_GPU_BRANCHES``. The one
    set-up the trainer, ``bench/`` and the GPU check share."""
    from dcae15.accel import forced_gpu_branches
    from dcae15.parallel import apply_parallelism, make_mesh

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    sharded = world_size > 1 or cfg.fsdp_one_rank  # one rank: the plain module, same checkpoint format
    mesh = make_mesh(device, world_size, cfg.hsdp_shard_size or node_shard_size(world_size)) if sharded else None
    forced = forced_gpu_branches()  # DCAE15_GPU_BRANCHES=1: the CPU takes the GPU run's checkpointing + compile
    apply_parallelism(model, mesh=mesh, device=device, mixed_precision=cfg.mixed_precision,
                      activation_checkpointing=cfg.activation_checkpointing or forced, compile=cfg.compile or forced,
                      shard=sharded)
    return model.train(), sharded


def make_optimizer(model: torch.nn.Module, cfg: DiffusionTrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters, DTensors included) where the device supports it: the
    per-parameter loop costs ~6x more on CPU at DiT-S size and is pure host overhead on a GPU."""
    kw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, ValueError):  # a device without a fused kernel
        return torch.optim.AdamW(model.parameters(), foreach=True, **kw)


def _clip_and_guard(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Global gradient norm (a device scalar, identical on all ranks); clip to ``max_norm`` and skip the update of
    a step whose norm is not finite — all without a host sync.

    With the fused AdamW both ride in its kernel: ``grad_scale`` = 1 / clip coefficient (no separate pass over
    the gradients) and ``found_inf`` (parameters and moments untouched, step count rolled back: the weights stay
    finite until the NaN guard reads the flag). Other optimizers clip with one ``foreach`` pass.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # the all-reduce of the shards' norms
    clip = math.isfinite(max_norm)
    # per group, as loaded: a checkpoint of a non-fused optimizer (written before fused AdamW) resumes as it was
    if all(g.get("fused") for g in optimizer.param_groups):
        if clip:
            optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # grads / this
        optimizer.found_inf = (~torch.isfinite(norm)).float()
    elif clip:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm, foreach=True)
    return norm


# ------------------------------------------------------------------------------------------------ distributed
def _init_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, created): reuse a live process group, else torchrun env, else a 1-rank group
    (``dcae15.distributed.init_distributed``: set_device, then the group with device_id and a long timeout)."""
    from dcae15.distributed import init_distributed

    return init_distributed()


class _AppState:
    """DCP ``Stateful`` bundle: model + optimizer (via get/set_state_dict), EMA, step, RNG and reader states."""

    def __init__(self, model, optimizer, ema: dict, train: dict):
        self.model, self.optimizer, self.ema, self.train = model, optimizer, ema, train

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        # Step, world size and every rank's reader cursor + RNG as one opaque blob (identical on all ranks):
        # DCP would otherwise flatten the per-rank list into keys that depend on the world size.
        blob = io.BytesIO()
        torch.save(dict(self.train), blob)
        blob.seek(0)
        return {"model": msd, "optim": osd, "ema": self.ema, "train": blob}

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        # sd["ema"] holds the very tensors of self.ema, loaded in place by DCP.
        blob = sd["train"]
        blob.seek(0)
        self.train.clear()
        self.train.update(torch.load(blob, weights_only=True))


# ------------------------------------------------------------------------------------------------ training
def train_diffusion(cfg: DiffusionTrainConfig, store_url: str, run_url: str, *, max_steps: int | None = None,
                    storage_options: dict | None = None) -> dict:
    """Train (or resume) a backbone on a latent store; returns the run pointer.

    Args:
        cfg: the run config.
        store_url: a complete latent store.
        run_url: the run directory (``<root>/runs/diffusion/<run_id_for(cfg, store_id)>`` by convention).
        max_steps: stop at this step in this call (a checkpoint is written there); the run goes on to
            ``cfg.steps`` when called again. None = ``cfg.steps``.

    Returns:
        {"run_url", "run_id", "store_id", "step", "checkpoint", "done"}. Returns at once when ``latest``
        already reached ``cfg.steps``.

    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf (the last good checkpoint is kept).
        ValueError: a config that does not fit the store or this world size; a run dir of another config.
    """
    info = store_info(store_url, storage_options)
    run_id = run_id_for(cfg, info["store_id"])
    target = cfg.steps if max_steps is None else min(cfg.steps, int(max_steps))
    run = open_run(run_url, storage_options)
    run.check(run_id)  # before anything else: a finished run of another config must not be returned as this one
    latest = run.latest()
    result = {"run_url": run_url, "run_id": run_id, "store_id": info["store_id"]}
    if latest is not None and latest["step"] >= target:
        return {**result, "step": latest["step"], "checkpoint": latest["checkpoint"],
                "done": latest["step"] >= cfg.steps}
    if not info["is_complete"]:
        raise ValueError(f"latent store {store_url!r} is not complete (units missing or not finalized); "
                         "finish encoding before training")
    check_plugin(cfg, info)  # an import-path backbone: one tiny forward before anything starts

    rank, ws, device, created = _init_distributed()
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        with rank_zero_claim(run_url, what="diffusion run", storage_options=storage_options):  # one writer per run
            latest = run.latest()  # again, claimed: a writer we waited for may have finished the run
            if latest is not None and latest["step"] >= target:
                return {**result, "step": latest["step"], "checkpoint": latest["checkpoint"],
                        "done": latest["step"] >= cfg.steps}
            return _train(cfg, store_url, run_url, info, run_id, target, rank, ws, device, storage_options)
    finally:
        torch.set_num_threads(threads_before)  # the caller (a flow worker, a notebook) keeps its own setting
        if created:
            dist.destroy_process_group()


def _write_config(cfg, store_url, run, info, run_id, mcfg) -> None:
    """config.yaml with the run id as the identity: a run dir of another run is refused (RunMismatchError)."""
    doc = {"run_id": run_id, "store_url": store_url, "store_id": info["store_id"],
           "ae_fingerprint": info["ae_fingerprint"], "ae_url": info["ae_url"], "objective": cfg.objective_name,
           "resolution": info["resolution"],
           "latent_norm": {"mode": cfg.normalize, "scaling_factor": info["scaling_factor"],
                           "channel_mean": info["channel_mean"], "channel_std": info["channel_std"]},
           "model_config": json.loads(json.dumps(dataclasses.asdict(mcfg))), "train": cfg.to_dict()}
    run.claim(run_id, doc)


def _train_state_compat(ts: dict) -> dict:
    """Checkpoints written before the elastic layout kept one {"reader", "rng"} per rank under "ranks"."""
    if "readers" not in ts and ts.get("ranks") is not None:
        ts["readers"] = [r["reader"] for r in ts["ranks"]]
        ts["data_world_size"] = ts["world_size"]
        ts["gens"] = None  # the old per-step CPU seeding: reseed the device generators
    return ts


def _train(cfg, store_url, run_url, info, run_id, target, rank, ws, device, storage_options) -> dict:
    from tqdm.auto import tqdm

    from dcae15 import parallel
    from dcae15.accel import enable_speed_switches
    from dcae15.distributed import new_io_group

    micro, accum = _micro_batch(cfg, ws)
    c, mcfg = info["channels"], _model_config(cfg, info)
    chans = cfg.adt.resolve(c, info["channel_choices"]) if cfg.adt.enabled else [c]
    objective = make_objective(cfg.objective_name)
    run = open_run(run_url, storage_options)
    if rank == 0:
        _write_config(cfg, store_url, run, info, run_id, mcfg)
    enable_speed_switches(device)  # TF32 for what stays fp32 (mixed_precision 'fp32', the loss, EMA, AdamW)
    model, sharded = build_training_model(cfg, mcfg, device, ws)
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model)  # fp32, sharded like the parameters (DTensors): no full copy on any rank
    parallel.check_placement(device, model=model, ema=ema.shadow)
    # Saves run their collectives on a gloo group of their own with a long timeout: async ones never interleave
    # with training's, and the ranks that wait for the slowest writer wait there, not in NCCL.
    ckpt_group = new_io_group()
    ckpt = Checkpointer(run, keep=cfg.keep_checkpoints, rank=rank, group=ckpt_group)
    try:
        app, gen = _restore(cfg, ckpt, model, optimizer, ema, rank, ws, device, storage_options)
        start, dws = int(app.train["step"]), int(app.train["data_world_size"])
        batches, reader_states = _open_batches(cfg, store_url, app.train["readers"], dws, ws, rank, device,
                                               storage_options)
        stepper = TrainStep(model, optimizer, ema, objective, gen, cfg, chans, mcfg.num_classes, c, accum, device,
                            sharded=sharded)
        tracker = open_tracker(cfg.logging, run_url=run_url, run_id=run_id, config=config_of(cfg), rank=rank)
        bar = tqdm(total=target, initial=start, disable=rank != 0 or not cfg.progress, desc=f"train {cfg.model}",
                   dynamic_ncols=True)
        step, window = start, _LogWindow(cfg, mcfg, micro, start, ws, device)  # its clock starts here
        try:
            with ckpt:  # leaving it: the save in flight completes (an error of the loop stays the one raised)
                while step < target:
                    batch = next(batches)  # prefetched in the background; non-blocking host-to-device copy
                    reader_states.update(batch["states"])
                    x0, y = batch["latents"].float(), batch["labels"]  # .float(): a no-op for fp32 batches
                    loss, gnorm, cprime = stepper(x0, y, step)
                    if step == start:  # once: the first batch, and the optimizer state it made, sit with the weights
                        parallel.check_placement(device, batch=[x0, y], optimizer=optimizer)
                    window.add(loss, gnorm, cprime)  # device-side, read at the next log (no per-step host sync)
                    step += 1
                    bar.update(1)
                    ckpt.poll()  # publishes the async save in flight once it completed
                    is_ckpt = step % cfg.checkpoint_every == 0 or step == target
                    if step % cfg.log_every == 0 or step == target or is_ckpt:
                        row = window.read(step)  # a checkpoint is never non-finite
                        if row is None:
                            raise _non_finite(window, step, cfg, ckpt)
                        if rank == 0:
                            ckpt.metrics.append(row)
                            tracker.log_metrics(row, step, prefix="train/")
                            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}",
                                            refresh=False)
                    if is_ckpt:
                        _gather_train_state(app.train, reader_states, gen, step, ws, dws)
                        ckpt.save(step, lambda url: _save_dcp(app, url, ckpt_group, cfg.async_checkpoint,
                                                              storage_options))
        finally:
            bar.close()
            tracker.close()
            batches.close()
    finally:
        dist.destroy_process_group(ckpt_group)
    result = {"run_url": run_url, "run_id": run_id, "store_id": info["store_id"], "step": step,
              "checkpoint": run.checkpoint_url(step), "done": step >= cfg.steps}
    if rank == 0 and result["done"]:
        run.finish({**result, "steps": cfg.steps})  # the done marker; more steps later continue the run
    return result


def _micro_batch(cfg: DiffusionTrainConfig, ws: int) -> tuple[int, int]:
    """(micro-batch, micro-batches per step) of one rank: the global batch split over ``ws`` ranks, then in
    ``grad_accum_steps`` passes.

    Raises:
        ValueError: a global batch the world size, or a per-rank batch the accumulation, does not divide.
    """
    if cfg.global_batch_size % ws:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by world size {ws}")
    local_bs = cfg.global_batch_size // ws
    accum = int(cfg.grad_accum_steps)
    if local_bs % accum:
        raise ValueError(f"grad_accum_steps={accum} does not divide the per-rank batch {local_bs} "
                         f"(global_batch_size {cfg.global_batch_size} / {ws} ranks)")
    return local_bs // accum, accum


def _restore(cfg, ckpt: Checkpointer, model, optimizer, ema: EMA, rank: int, ws: int, device: torch.device,
             storage_options) -> tuple[_AppState, torch.Generator]:
    """(app state, device generator): model, optimizer, EMA and train state (step, world sizes, reader cursors,
    generator states) loaded from the checkpoint ``latest`` names (nothing for a new run; newer, interrupted saves
    deleted), and the noise / timestep / dropout / c' generator on the device. Its state is part of the
    checkpoint, which keeps resume exact; it is reseeded for a new run or at another world size."""
    import torch.distributed.checkpoint as dcp

    train_state: dict = {"step": 0, "world_size": ws, "data_world_size": ws, "readers": None, "gens": None}
    app = _AppState(model, optimizer, ema.shadow, train_state)

    def load(url: str) -> None:
        with quiet_single_process_load():
            dcp.load({"app": app}, storage_reader=dcp_reader(url, storage_options))
        _train_state_compat(train_state)
        ema.refresh()

    ckpt.resume(load, drop_partial=True)
    gen = torch.Generator(device=device)
    if train_state["gens"] is not None and train_state["world_size"] == ws:
        gen.set_state(train_state["gens"][rank])
    else:  # a new run, or another world size: per-rank noise streams cannot carry over
        gen.manual_seed(_noise_seed(cfg.seed, rank, int(train_state["step"])))
    return app, gen


def _open_batches(cfg, store_url, readers: list | None, dws: int, ws: int, rank: int, device: torch.device,
                  storage_options) -> tuple[Any, dict]:
    """(batches, reader cursors): this rank's rows of each global batch, read from the reader rank(s) of the run's
    data layout of ``dws`` readers (elastic), each resumed at its saved cursor; the cursors of the readers this
    rank uses, which the loop keeps up to date from the batches."""
    from torch.utils.data import DataLoader

    from dcae15.diffusion.data import DevicePrefetcher, RankBatches, layout_ranks
    from storage.reader import LatentStreamDataset

    sources, reader_states = [], {}
    for q, lo, hi in layout_ranks(cfg.global_batch_size, dws, ws, rank):
        ds = LatentStreamDataset(store_url, batch_size=cfg.global_batch_size // dws, seed=cfg.seed, rank=q,
                                 world_size=dws, shuffle_chunks=cfg.shuffle_chunks, flip=cfg.flip,
                                 normalize=cfg.normalize, infinite=True, storage_options=storage_options)
        if readers is not None:
            ds.load_state_dict(readers[q])
            reader_states[q] = readers[q]
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        sources.append((q, iter(loader), lo, hi))
    return DevicePrefetcher(RankBatches(sources), device, depth=cfg.prefetch_batches), reader_states


def _gather_train_state(train_state: dict, reader_states: dict, gen: torch.Generator, step: int, ws: int,
                        dws: int) -> None:
    """Every layout rank's reader cursor and every rank's generator, gathered into ``train_state`` so that the saved
    object is identical on all ranks (DCP keeps one copy). Collective (before the save, on the default group)."""
    gathered = [None] * ws
    dist.all_gather_object(gathered, {"readers": reader_states, "gen": gen.get_state()})
    readers = [None] * dws
    for g in gathered:
        for q, st in g["readers"].items():
            readers[q] = st
    train_state.update(step=step, world_size=ws, data_world_size=dws, readers=readers,
                       gens=[g["gen"] for g in gathered], ranks=None)


def _save_dcp(app: _AppState, url: str, group, asynchronous: bool, storage_options):
    """The checkpoint payload: one DCP directory at ``url`` written by every rank over the gloo ``group``; for an
    async save (staged to CPU memory, written by a background thread) the future of its completion."""
    import torch.distributed.checkpoint as dcp

    if not asynchronous:
        dcp.save({"app": app}, storage_writer=dcp_writer(url, storage_options), process_group=group)
        return None
    fut = dcp.async_save({"app": app}, storage_writer=dcp_writer(url, storage_options), process_group=group)
    return getattr(fut, "upload_completion", fut)


class _LogWindow:
    """The loop's bookkeeping between two logs: loss, grad norm and c' summed on the device, with the first step
    whose loss or grad norm was not finite; read (the only host sync) every ``log_every`` steps and before each
    checkpoint into the logged row (means, lr, throughput, MFU, memory)."""

    def __init__(self, cfg: DiffusionTrainConfig, mcfg, micro: int, step: int, ws: int, device: torch.device):
        self.cfg, self.ws, self.device = cfg, ws, device
        h, w = mcfg.input_size
        self.tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.flops_img = train_flops_per_image(mcfg, micro, 2 if (cfg.adt.enabled and cfg.adt.include_full) else 1)
        self.peak = _peak_flops(cfg, device)
        self.n, self.t, self.cpu = 0, time.perf_counter(), time.thread_time()
        self.acc = torch.zeros(3, device=device)  # loss, grad norm, c' summed over the window (local)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.step_dev = torch.full((), step, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, gnorm: torch.Tensor, cprime: torch.Tensor) -> None:
        """One step's values, on the device (no host sync)."""
        self.step_dev += 1
        stats = torch.stack([loss, gnorm.float(), cprime.float().mean()])
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(stats[:2]).all(), self.step_dev,
                                     self.first_bad)
        self.acc += stats
        self.n += 1

    def read(self, step: int) -> dict | None:
        """The window's row (means over its steps and the ranks), then a new window; None when a value is not
        finite. Collective: every rank gets the same verdict."""
        cfg, n = self.cfg, self.n
        vals = self.acc.clone()
        dist.all_reduce(vals)
        loss_sum, gnorm_sum, cp_sum = vals.tolist()
        if not (math.isfinite(loss_sum) and math.isfinite(gnorm_sum)):
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        img_s = n * cfg.global_batch_size / (time.perf_counter() - self.t)
        row = {"step": step, "loss": loss_sum / self.ws / n, "grad_norm": gnorm_sum / self.ws / n,
               "lr": lr_at(step - 1, cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                           total_steps=cfg.steps),
               "c_prime": cp_sum / self.ws / n, "img_per_s": img_s, "tokens_per_s": img_s * self.tokens,
               "time": time.time(),
               # CPU time of the training thread per step: its host work on a GPU (must stay below the step
               # time), everything on CPU; unlike img_per_s, blind to other processes' load
               "thread_cpu_s_per_step": (time.thread_time() - self.cpu) / n}
        if self.peak:
            row["mfu"] = img_s * self.flops_img / (self.peak * self.ws)
        if self.device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.n, self.t, self.cpu = 0, time.perf_counter(), time.thread_time()
        self.acc.zero_()
        return row

    def first_bad_step(self) -> int:
        """The first step whose loss or grad norm was not finite on any rank (0: unknown). Collective."""
        bad = self.first_bad.clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return int(bad)


def _non_finite(window: _LogWindow, step: int, cfg: DiffusionTrainConfig, ckpt: Checkpointer) -> NonFiniteLossError:
    """The error that stops a run whose window turned non-finite, naming the first bad step and the last good
    checkpoint (after the save in flight, of a checked step, completed)."""
    fb = window.first_bad_step()
    where = f"step {fb}" if fb else f"steps {step - window.n + 1}..{step}"
    ckpt.wait()
    return NonFiniteLossError(
        f"{where}: the loss or grad norm is not finite (checked every log_every={cfg.log_every} steps and "
        f"before each checkpoint; updates with a non-finite gradient were skipped; the run stopped at step "
        f"{step} without saving). The last good checkpoint "
        f"is {ckpt.run.latest() or 'none'}. Lower lr or check the data.")


class TrainStep:
    """One optimizer step of the trainer on a local batch already on the device (also what bench/ times):
    device-generator draws, the (ADT) loss over ``accum`` micro-batches, fused clip + NaN guard, AdamW, EMA.
    No host sync: loss, grad norm and c' come back as device tensors."""

    def __init__(self, model, optimizer, ema: EMA, objective, gen: torch.Generator, cfg: DiffusionTrainConfig,
                 chans: list[int], null_class: int, channels: int, accum: int, device: torch.device, *,
                 sharded: bool = True):
        self.model, self.optimizer, self.ema, self.objective, self.gen, self.cfg = (model, optimizer, ema,
                                                                                    objective, gen, cfg)
        self.chans = torch.tensor(chans, dtype=torch.long, device=device)
        self.null_class, self.c, self.accum, self.device = null_class, channels, accum, device
        self.max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        # ``sharded`` False: the plain module (one rank), which autocasts where FSDP2's bf16 policy would cast
        self.sharded = sharded
        self.amp = lambda: (bf16_autocast(device, "bf16") if not sharded and cfg.mixed_precision == "bf16"
                            and gpu_branches(device) else contextlib.nullcontext())

    def __call__(self, x0: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        cfg, gen, device, model, accum = self.cfg, self.gen, self.device, self.model, self.accum
        # All random draws for the whole local batch at once, on the device: micro-batching then changes
        # nothing but the fp summation order.
        noise = torch.randn(x0.shape, generator=gen, device=device)
        u = torch.rand(x0.shape[0], generator=gen, device=device)
        drop = torch.rand(x0.shape[0], generator=gen, device=device) < cfg.label_dropout
        y = torch.where(drop, self.null_class, y)
        mask, cprime = draw_mask(cfg.adt, self.chans, x0.shape[0], self.c, gen, device)
        x_t, t, tgt = self.objective.prepare(x0, noise, u)
        norm = LossNorm(x0.shape, mask)
        micro = x0.shape[0] // accum
        loss = torch.zeros((), device=device)
        for i in range(accum):
            sl = slice(i * micro, (i + 1) * micro)
            if accum > 1 and self.sharded:  # reduce gradients across ranks only once, after the last micro-batch
                model.set_requires_gradient_sync(i == accum - 1)
            with self.amp():
                part = micro_loss(model, x_t[sl], t[sl], y[sl], tgt[sl], None if mask is None else mask[sl],
                                  cfg.adt, norm)
            part.backward()
            loss += part.detach()
        gnorm = _clip_and_guard(model, self.optimizer, self.max_norm)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, total_steps=cfg.steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.ema_every == 0:  # the update that produces step + 1 (every step by default)
            self.ema.update(decay_at(cfg.ema_decay, step, warmup=cfg.ema_warmup,
                                     warmup_steps=cfg.ema_warmup_steps) ** cfg.ema_every)
        return loss, gnorm, cprime


# ------------------------------------------------------------------------------------------------ run pointers
def latest_checkpoint(run_url: str, storage_options: dict | None = None) -> tuple[int, str]:
    """(step, checkpoint URL) that the run's ``latest`` pointer names.

    Raises:
        FileNotFoundError: the run has no complete checkpoint yet.
    """
    ptr = open_run(run_url, storage_options).latest()
    if ptr is None:
        raise FileNotFoundError(f"diffusion run {run_url!r} has no 'latest' checkpoint pointer yet")
    return int(ptr["step"]), ptr["checkpoint"]


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> dict:
    """``python -m dcae15.diffusion.train --config run.yaml`` (also under ``torchrun --nproc_per_node N``).

    run.yaml is either a full run file (``store_url``, ``run_url`` or ``root_url``, optional
    ``storage_options``, and ``train:`` with DiffusionTrainConfig fields) or just the DiffusionTrainConfig fields
    (e.g. ``yaml.safe_dump(cfg.to_dict())``) with ``--store`` and ``--run`` given. With ``root_url`` the run dir is
    ``<root>/runs/diffusion/<run_id>``.
    """
    import yaml

    ap = argparse.ArgumentParser(description="Train a diffusion backbone on a latent store (FSDP2, resumable).")
    ap.add_argument("--config", required=True, help="YAML run file or DiffusionTrainConfig fields")
    ap.add_argument("--store", default=None, help="latent store URL (overrides store_url)")
    ap.add_argument("--run", default=None, help="run directory URL (overrides run_url / root_url)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop at this step (resumable)")
    args = ap.parse_args(argv)
    fs, path = url_to_fs(args.config)
    doc = yaml.safe_load(fs.cat_file(path)) or {}
    if "train" not in doc and "store_url" not in doc:
        doc = {"train": doc}  # bare DiffusionTrainConfig fields
    store_url = args.store or doc.get("store_url")
    if store_url is None:
        raise ValueError(f"{args.config}: give 'store_url' in the file or --store")
    opts = doc.get("storage_options")
    cfg = DiffusionTrainConfig.from_dict(doc.get("train") or {})
    run_url = args.run or doc.get("run_url")
    if run_url is None:
        if "root_url" not in doc:
            raise ValueError(f"{args.config}: give 'run_url' or 'root_url' (or --run)")
        run_url = Root(doc["root_url"]).diffusion_run(run_id_for(cfg, store_info(store_url, opts)["store_id"]))
    out = train_diffusion(cfg, store_url, run_url, max_steps=args.max_steps, storage_options=opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
