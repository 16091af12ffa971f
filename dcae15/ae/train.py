"""Structured-latent autoencoder training (DC-AE 1.5, Eq. 1): three phases, L1 + LPIPS (+ PatchGAN), exact resume.

The run directory is a ``storage.rundir.RunDir`` (config.yaml with the run's identity, metrics.jsonl,
``checkpoints/step-XXXXXXX.pt`` torch files, ``latest`` written last, ``done.json``) plus, at the end, ``model/``
(save_pretrained) before ``done.json``. A config that differs only in operational fields or in ``steps`` continues
the same run (more steps: from its last checkpoint, even once finished). Everything random is a pure function of
(seed, step) — the c' draws, the batch order, the flips — so resuming from a checkpoint continues exactly as if
the run had never stopped. Checkpoints go through ``dcae15.checkpointer.Checkpointer``, as the diffusion trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dcae15.accel import enable_speed_switches, gpu_branches
from dcae15.ae.channels import ChannelSampling, step_generator
from dcae15.ae.data import ImageBatches
from dcae15.ae.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from dcae15.ae.model import AE_PRESETS, StructuredAutoencoder
from dcae15.checkpointer import Checkpointer, load_torch_file, save_torch_file
from storage.layout import AE_MODEL
from storage.lease import rank_zero_claim
from storage.rundir import HORIZON, OPERATIONAL, RunDir, identity
from dcae15.ema import EMA
from dcae15.lr_schedule import SCHEDULES, lr_at
from dcae15.parallel import check_placement, place
from dcae15.tracking import TrackingConfig, config_of, open_tracker
from dcae15.typed_config import above, at_least, between, check_declared, from_dict, one_of

__all__ = ["AETrainConfig", "PHASES", "PERCEPTUAL", "train_autoencoder", "trainable_parameters", "ae_loss"]

# Phase defaults from DC-AE / DC-AE 1.5 (papers, training details): (lr, betas, weight decay, GAN weight).
PHASES: dict[str, dict[str, Any]] = {
    "full": dict(lr=6.4e-5, betas=(0.9, 0.999), weight_decay=0.1, w_gan=0.0),
    "latent_adaptation": dict(lr=1.6e-5, betas=(0.9, 0.999), weight_decay=0.001, w_gan=0.0),
    "refinement": dict(lr=5.4e-5, betas=(0.5, 0.9), weight_decay=0.001, w_gan=0.1),
    # Figure 3's setting: the encoder (so the latent) frozen, the decoder re-fitted to one fixed c'
    "decoder_finetune": dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, w_gan=0.0),
}
PERCEPTUAL = ("lpips-vgg", "lpips-alex", "lpips-squeeze", "none")


@dataclass(kw_only=True)
class AETrainConfig:
    """One autoencoder training phase.

    Attributes:
        preset: architecture (``AE_PRESETS``) when starting from scratch.
        init_from: URL of a saved AE to start from instead (phases 2 and 3 start from the previous phase).
        name: a label for the phase in a recipe (logs, stage names); not part of the run's identity.
        phase: "full" (all weights), "latent_adaptation" (encoder head + decoder input), "refinement"
            (decoder head, + GAN) or "decoder_finetune" (the whole decoder at one fixed c', encoder frozen).
        finetune_channels: the fixed c' of a "decoder_finetune" phase (required there, refused elsewhere).
        resolution: training crop size.
        steps / batch_size: optimisation length and batch.
        lr / betas / weight_decay: AdamW; None takes the phase default (``PHASES``).
        warmup_steps / schedule: linear warm-up then "constant" or "cosine" (to 0 at ``steps``).
        grad_clip: max global grad norm (0 = off).
        structured: train with Eq. 1 masking; channel_choices None takes the AE's c' list.
        channel_mode / channels_per_step / include_full: see ``ChannelSampling``.
        w_l1 / w_lpips / perceptual: reconstruction loss; perceptual "none" drops LPIPS.
        lpips_weights: explicit path of the torchvision backbone file (else $DCAE15_WEIGHTS / torch hub cache).
        lpips_random_backbone: tests only — an un-pretrained LPIPS trunk (meaningless numbers).
        w_gan / gan_start_step: hinge PatchGAN generator weight (None: phase default) and first GAN step.
        disc_channels / disc_layers / disc_lr: discriminator size and AdamW lr (betas 0.5, 0.9).
        ema_decay: EMA of the AE weights (None = off); the saved model is the EMA when on.
        hflip: random horizontal flips of training images.
        seed: everything random derives from (seed, step).
        checkpoint_every / keep_checkpoints / log_every: operational.
        device: "auto" (cuda if available; under torchrun ``cuda:$LOCAL_RANK``), "cpu" or "cuda[:i]".
        bf16: bf16 autocast of the AE, LPIPS and the discriminator on CUDA (weights, optimiser and loss sums stay
            fp32). bf16_on_cpu: the same on CPU (tests of the autocast path; slow on most CPUs); so does
            DCAE15_GPU_BRANCHES=1.
        num_workers / prefetch_factor / loader_context: DataLoader worker processes decoding upcoming steps
            (0: the training process decodes, one thread prefetches the next step's bytes; None: up to 8 per GPU,
            0 on a CPU run, see ``loader_workers``); their start method. Batches reach the GPU from pinned memory.

    ``batch_size`` is the global batch: under torchrun each of the W ranks trains on its own disjoint B/W images
    of every step (DDP averages the gradients), so W processes compute what one process computes with B.
    Resume rule: a run resumes exactly (bit for bit on the same hardware) at the same world size; at another
    world size dividing ``batch_size`` it continues with the same images, flips and c' draws at every step, so
    only the floating-point reduction order differs.
    """

    name: str | None = field(default=None, metadata=OPERATIONAL)
    preset: str = "tiny-f8c32"
    init_from: str | None = None
    phase: str = field(default="full", metadata=one_of(*PHASES))
    finetune_channels: int | None = field(default=None, metadata=at_least(1))
    resolution: int = field(default=32, metadata=at_least(1))
    steps: int = field(default=1000, metadata={**HORIZON, **at_least(1)})  # a longer run continues a shorter one
    batch_size: int = field(default=16, metadata=at_least(1))
    lr: float | None = field(default=None, metadata=above(0))
    betas: tuple[float, float] | None = field(default=None, metadata=between(0, 1, hi_open=True, each=2))
    weight_decay: float | None = field(default=None, metadata=at_least(0))
    warmup_steps: int = field(default=0, metadata=at_least(0))
    schedule: str = field(default="constant", metadata=one_of(*SCHEDULES))
    grad_clip: float = field(default=1.0, metadata=at_least(0))
    structured: bool = True
    channel_choices: tuple[int, ...] | None = None
    channel_mode: str = field(default="per_batch", metadata=one_of("per_batch", "per_sample"))
    channels_per_step: int = field(default=1, metadata=at_least(1))
    include_full: bool = False
    w_l1: float = field(default=1.0, metadata=at_least(0))
    w_lpips: float = field(default=0.5, metadata=at_least(0))
    perceptual: str = field(default="lpips-vgg", metadata=one_of(*PERCEPTUAL))
    lpips_weights: str | None = None
    lpips_random_backbone: bool = False
    w_gan: float | None = field(default=None, metadata=at_least(0))
    gan_start_step: int = field(default=0, metadata=at_least(0))
    disc_channels: int = 64
    disc_layers: int = field(default=3, metadata=at_least(1))
    disc_lr: float | None = field(default=None, metadata=above(0))
    ema_decay: float | None = field(default=None, metadata=between(0, 1, lo_open=True, hi_open=True))
    hflip: bool = True
    seed: int = 0
    checkpoint_every: int = field(default=500, metadata={**OPERATIONAL, **at_least(1)})
    keep_checkpoints: int = field(default=2, metadata={**OPERATIONAL, **at_least(1)})
    log_every: int = field(default=10, metadata={**OPERATIONAL, **at_least(1)})
    logging: TrackingConfig = field(default_factory=TrackingConfig, metadata=OPERATIONAL)
    progress: bool = field(default=True, metadata=OPERATIONAL)
    prefetch: bool = field(default=True, metadata=OPERATIONAL)
    device: str = field(default="auto", metadata=OPERATIONAL)
    bf16: bool = True
    bf16_on_cpu: bool = False
    num_workers: int | None = field(default=None, metadata={**OPERATIONAL, **at_least(0)})
    prefetch_factor: int = field(default=4, metadata={**OPERATIONAL, **at_least(1)})
    loader_context: str = field(default="forkserver", metadata={**OPERATIONAL, **one_of("fork", "forkserver", "spawn")})

    def __post_init__(self) -> None:
        if isinstance(self.logging, dict):
            self.logging = TrackingConfig(**self.logging)
        check_declared(self)  # the ranges and choices declared with the fields; None takes the phase default
        d = PHASES[self.phase]
        self.lr = d["lr"] if self.lr is None else float(self.lr)
        self.betas = tuple(d["betas"] if self.betas is None else (float(b) for b in self.betas))
        self.weight_decay = d["weight_decay"] if self.weight_decay is None else float(self.weight_decay)
        self.w_gan = d["w_gan"] if self.w_gan is None else float(self.w_gan)
        self.disc_lr = self.lr if self.disc_lr is None else float(self.disc_lr)
        if (self.phase == "decoder_finetune") != (self.finetune_channels is not None):
            raise ValueError(f"AETrainConfig.finetune_channels={self.finetune_channels!r} with phase={self.phase!r}: "
                             "a decoder_finetune phase needs the fixed c' in finetune_channels, other phases none")
        if self.finetune_channels is not None:
            self.finetune_channels = int(self.finetune_channels)
        if self.channel_choices is not None:
            self.channel_choices = tuple(int(c) for c in self.channel_choices)
        if self.init_from is None and self.preset not in AE_PRESETS:
            raise ValueError(f"AETrainConfig.preset={self.preset!r}; known: {sorted(AE_PRESETS)} (or set init_from)")
        if self.w_l1 == 0 and (self.w_lpips == 0 or self.perceptual == "none"):
            raise ValueError("AETrainConfig: the reconstruction loss is empty (w_l1=0 and no LPIPS)")

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None = None) -> "AETrainConfig":
        """Checked construction (unknown fields, types, ranges), errors naming ``path`` (``autoencoder.train``)."""
        return from_dict(cls, d, path)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the run computes (``storage.rundir.identity``): not the operational ones,
        and not ``steps`` (a longer run continues the shorter one) unless the cosine schedule depends on it."""
        return identity(self, self.to_dict(), keep_horizon=self.schedule == "cosine")


# ---------------------------------------------------------------------------------------------------------------
# Pieces of a step
# ---------------------------------------------------------------------------------------------------------------


def trainable_parameters(model: StructuredAutoencoder, phase: str) -> list[nn.Parameter]:
    """The parameters a phase trains; the rest are frozen (requires_grad=False).

    full: everything. decoder_finetune: the whole decoder. latent_adaptation: the "middle" around the latent — the
    encoder's last stage and output conv, the decoder's input conv and its lowest-resolution stage. refinement: the
    decoder's head — its highest-resolution stage, output norm and output conv.
    """
    enc, dec = model.net.encoder, model.net.decoder
    if phase == "full":
        modules = [model.net]
    elif phase == "latent_adaptation":
        modules = [enc.down_blocks[-1], enc.conv_out, dec.conv_in, dec.up_blocks[-1]]
    elif phase == "decoder_finetune":
        modules = [dec]
    elif phase == "refinement":
        modules = [dec.up_blocks[0], dec.up_blocks[1], dec.norm_out, dec.conv_out]  # stage 0 is empty in DC-AE
    else:
        raise ValueError(f"unknown phase {phase!r}; allowed: {sorted(PHASES)}")
    model.requires_grad_(False)
    for m in modules:
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def ae_loss(x: torch.Tensor, y: torch.Tensor, *, w_l1: float, w_lpips: float, lpips_net: nn.Module | None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 + w_lpips · LPIPS between images in [-1,1]; returns the loss and its parts as detached 0-dim tensors
    (reading them is a GPU sync point: the trainer does so only on logging steps)."""
    l1 = (x - y).abs().mean()
    loss = w_l1 * l1
    parts = {"l1": l1.detach()}
    if lpips_net is not None and w_lpips > 0:
        lp = lpips_net(y.float(), x.float()).mean()
        loss = loss + w_lpips * lp
        parts["lpips"] = lp.detach()
    return loss, parts


# ---------------------------------------------------------------------------------------------------------------
# Run directory helpers
# ---------------------------------------------------------------------------------------------------------------


def _open_run(run_url: str, storage_options: dict | None) -> RunDir:
    return RunDir(run_url, storage_options, kind="AE", checkpoint_suffix=".pt")


def _claim(run: RunDir, cfg: AETrainConfig, dataset_fp: str, dist_: _Dist) -> str:
    """Write config.yaml on a new run; on an existing run refuse a different identity (config or dataset). Rank 0
    first, then the others (which then only check it)."""
    from storage.fingerprint import fingerprint

    cfg_fp = fingerprint({"config": cfg.identity(), "dataset": dataset_fp})
    doc = {"config": cfg.to_dict(), "dataset_fingerprint": dataset_fp}
    if dist_.rank == 0:
        run.claim(cfg_fp, doc)
    dist_.barrier()
    if dist_.rank != 0:
        run.claim(cfg_fp, doc)
    return cfg_fp


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


class _Dist:
    """Where this process sits: rank, world size, device; a process group only when there are several ranks
    (``dcae15.distributed``: the GPU made current first, then the group), with a gloo group for the waits behind
    rank 0's checkpoint writes."""

    def __init__(self, cfg: AETrainConfig) -> None:
        from dcae15.distributed import init_distributed, new_io_group

        want = None if cfg.device == "auto" else torch.device(cfg.device)
        if want is not None and want.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"AETrainConfig.device={cfg.device!r} but CUDA is not available; use 'cpu' or 'auto'")
        rank, world, local, self.created = init_distributed(use_cuda=want is None or want.type == "cuda",
                                                            single_process_group=False)
        self.on = world > 1
        self.rank, self.world = (rank, world) if self.on else (0, 1)
        # "auto" / "cuda": this rank's GPU (LOCAL_RANK); an explicit "cuda:i" or "cpu" is taken as given
        self.device = want if want is not None and (want.type == "cpu" or want.index is not None) else local
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.io = new_io_group() if self.on else None

    def barrier(self) -> None:
        from dcae15.distributed import io_barrier

        io_barrier(self.io)  # waits behind rank 0's writes: the long I/O timeout, no NCCL watchdog

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The average over ranks of per-rank scalars (the logged losses), so logs equal one process's."""
        if not self.on or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=self.io)  # CPU numbers: gloo
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def close(self) -> None:
        import torch.distributed as dist

        if self.io is not None and not self.created:
            dist.destroy_process_group(self.io)  # (destroying the default group below takes its subgroups along)
        if self.created:
            dist.destroy_process_group()


class _Reconstruct(nn.Module):
    """The AE step's forward as one module call, so DDP sees it: encode once, decode once per c' (Eq. 1)."""

    def __init__(self, model: StructuredAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, channel_list: list) -> list[torch.Tensor]:
        z = self.model.encode(x)  # (B, c, H/f, W/f)
        return [self.model.decode(z, channels=ch) for ch in channel_list]  # each (B, 3, H, W)


def _ddp(module: nn.Module, dist_: _Dist) -> nn.Module:
    """DDP over the trainable parameters (frozen ones are not synchronised: they never change)."""
    if not dist_.on:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if dist_.device.type == "cuda":
        # DC-AE 1.0 models use BatchNorm: global-batch statistics keep W ranks equal to one process (CUDA only;
        # on CPU each rank normalises over its own slice)
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [dist_.device.index] if dist_.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def _build_model(cfg: AETrainConfig, storage_options: dict | None) -> StructuredAutoencoder:
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        return StructuredAutoencoder.from_pretrained(cfg.init_from, storage_options=storage_options)
    return StructuredAutoencoder.from_preset(cfg.preset)


def _build_lpips(cfg: AETrainConfig, device: torch.device) -> nn.Module | None:
    if cfg.perceptual == "none" or cfg.w_lpips == 0:
        return None
    from dcae15.metrics.lpips_offline import build_lpips

    net = cfg.perceptual.split("-", 1)[1]
    return place(build_lpips(net, weights=cfg.lpips_weights, random_backbone=cfg.lpips_random_backbone), device)


def _local(ch: int | torch.Tensor | None, rows: slice) -> int | torch.Tensor | None:
    """This rank's part of a c' draw: per-sample draws are made for the global batch, then sliced."""
    return ch[rows] if isinstance(ch, torch.Tensor) else ch


def loader_workers(cfg: AETrainConfig, device: torch.device, local_world: int = 1) -> int:
    """DataLoader worker processes: ``cfg.num_workers``, or for None (the default) where the GPU branches are taken
    (``dcae15.accel``) this rank's share of the node's cores, at most 8 (JPEG decoding must keep up with the GPU),
    and 0 on a plain CPU run (workers would only compete with the training thread for the same cores)."""
    if cfg.num_workers is not None:
        return int(cfg.num_workers)
    if not gpu_branches(device):
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_world)))


def _batches(cfg: AETrainConfig, batches: ImageBatches, start: int, end: int, device: torch.device, workers: int):
    """Iterator over this rank's batches of steps [start, end): DataLoader workers decode ahead when configured."""
    if workers == 0:
        return (batches.batch(step) for step in range(start, end))
    from torch.utils.data import DataLoader

    from dcae15.ae.data import StepBatches

    # forkserver by default: forking a process that already runs threads (Prefect, tqdm) can deadlock workers
    return iter(DataLoader(StepBatches(batches), batch_size=None, sampler=range(start, end),
                           num_workers=workers, prefetch_factor=cfg.prefetch_factor,
                           pin_memory=device.type == "cuda", multiprocessing_context=cfg.loader_context))


def train_autoencoder(cfg: AETrainConfig, dataset_url: str, run_url: str, *, stop_at: int | None = None,
                      storage_options: dict | None = None, dataset: Any = None) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) one AE phase, in this process or as one torchrun rank.

    Args:
        cfg: the phase's config.
        dataset_url: packed image dataset (``storage.shards.open_dataset``).
        run_url: the run directory; the same URL resumes the run.
        stop_at: leave after checkpointing this step without finishing (time-sliced jobs, preemption tests).
        dataset: an already opened dataset (skips ``open_dataset``; its fingerprint still identifies the run).

    Returns:
        The pointer ``{"model_url", "fingerprint", "run_url", "steps", "config_fingerprint", "finished", ...}``;
        a finished run returns its stored pointer without doing anything.

    Raises:
        ValueError: a run directory started with another config or dataset; a global batch the world size does
            not divide.
        MissingWeightsError: LPIPS backbone weights missing (set ``perceptual: none`` to train without LPIPS).
    """
    dist_ = _Dist(cfg)
    try:
        with rank_zero_claim(run_url, what="AE run", storage_options=storage_options):  # one writer per run
            return _train(cfg, dataset_url, run_url, stop_at, storage_options, dataset, dist_)
    finally:
        dist_.close()


def _train(cfg, dataset_url, run_url, stop_at, storage_options, dataset, dist_: _Dist) -> dict[str, Any]:
    from tqdm.auto import tqdm

    run = _open_run(run_url, storage_options)
    if dataset is None:
        from storage.shards import open_dataset

        dataset = open_dataset(dataset_url, storage_options)
    if cfg.batch_size % dist_.world:
        raise ValueError(f"AETrainConfig.batch_size={cfg.batch_size} (the global batch) is not a multiple of the "
                         f"world size {dist_.world}; change the batch size or the number of processes")
    cfg_fp = _claim(run, cfg, str(dataset.fingerprint), dist_)
    finished = run.done()
    if finished is not None and int(finished.get("steps", 0)) >= cfg.steps:
        return finished  # a longer run (more steps, same identity) continues from the last checkpoint below

    device = dist_.device
    parts = _build(cfg, storage_options, device)
    tracker = open_tracker(cfg.logging, run_url=run.url, run_id=run.url.rstrip("/").rsplit("/", 1)[-1],
                           config=config_of(cfg), rank=dist_.rank)
    ckpt = Checkpointer(run, keep=cfg.keep_checkpoints, rank=dist_.rank, group=dist_.io)
    start = ckpt.resume(lambda url: parts.load(load_torch_file(url, run.storage_options), run, dist_))
    check_placement(device, model=parts.model, optimizer=parts.opt, disc=parts.disc, disc_optimizer=parts.disc_opt,
                    ema=parts.ema.shadow if parts.ema is not None else {}, lpips=parts.lpips)
    ae_step = _AEStep(cfg, parts, dist_)  # DDP wraps the modules here, after any checkpoint load
    workers = loader_workers(cfg, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    batches = ImageBatches(dataset, batch_size=cfg.batch_size, resolution=cfg.resolution, seed=cfg.seed,
                           hflip=cfg.hflip, prefetch=cfg.prefetch and workers == 0, rank=dist_.rank,
                           world_size=dist_.world)
    enable_speed_switches(device, conv=True)  # TF32 for the fp32 paths, cuDNN autotuning for the conv-only AE
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"AE {cfg.name or cfg.phase}",
               disable=not cfg.progress or dist_.rank != 0)
    loader = _batches(cfg, batches, start, end, device, workers)
    t0 = time.perf_counter()
    try:
        for step in bar:
            x, _ = next(loader)  # decoded ahead by the loader's workers (or the prefetch thread's bytes)
            if device.type == "cuda" and not x.is_pinned():
                x = x.pin_memory()  # a pageable source would make the copy below synchronous
            x = x.to(device, non_blocking=True)
            loss, logs, channel_list, lr = ae_step(x, step)
            done_steps = step + 1
            if done_steps % cfg.log_every == 0 or done_steps == end:
                # the only GPU sync of a step, on logging steps; averaged over ranks: the numbers one process logs
                logs = dist_.mean({k: float(v) for k, v in {"loss": loss.detach(), **logs}.items()})
                row = {"step": done_steps, "lr": lr, **logs,
                       "channels": [c if isinstance(c, int) or c is None else "per-sample" for c in channel_list],
                       "sec": round(time.perf_counter() - t0, 3)}
                ckpt.metrics.append(row)
                tracker.log_metrics(row, done_steps, prefix="ae/")
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)  # shown at the next refresh (mininterval)
            if done_steps % cfg.checkpoint_every == 0 or done_steps == end:
                # every rank goes on (or leaves: stop_at) once `latest` names it
                ckpt.save(done_steps, lambda url: parts.save(url, done_steps, dist_, run.storage_options))
    finally:
        bar.close()
        tracker.close()
        batches.close()
        del loader  # stops DataLoader workers

    last = ckpt.metrics[-1] if ckpt.metrics else {}
    if end < cfg.steps:
        return {"run_url": run.url, "finished": False, "step": end, "config_fingerprint": cfg_fp,
                "loss": last.get("loss")}
    return _finish(cfg, run, parts, dist_, cfg_fp, last, storage_options)


@dataclass
class _Parts:
    """What an AE phase trains and with what (``_build``); saved and restored together as one checkpoint."""

    model: StructuredAutoencoder
    params: list[nn.Parameter]  # the phase's trainable ones (``trainable_parameters``)
    sampling: ChannelSampling | None  # the c' draws of Eq. 1 (None: the full latent only)
    opt: torch.optim.Optimizer
    disc: nn.Module | None  # the PatchGAN discriminator (w_gan > 0) and its optimizer
    disc_opt: torch.optim.Optimizer | None
    ema: EMA | None
    lpips: nn.Module | None

    def save(self, url: str, step: int, dist_: _Dist, storage_options: dict | None) -> None:
        """The checkpoint payload: one torch file (rank 0 writes it; every rank holds the same weights)."""
        if dist_.rank != 0:
            return
        out = {"step": step, "model": self.model.net.state_dict(), "opt": self.opt.state_dict(),
               "rng_cpu": torch.get_rng_state(), "world_size": dist_.world}
        if self.disc is not None:
            out.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        save_torch_file(url, out, storage_options)

    def load(self, ckpt: dict[str, Any], run: RunDir, dist_: _Dist) -> None:
        """Restore what ``save`` wrote (the CPU generator included: the draws go on as if never interrupted)."""
        self.model.net.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt["disc"])
            self.disc_opt.load_state_dict(ckpt["disc_opt"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if int(ckpt.get("world_size", 1)) != dist_.world and dist_.rank == 0:
            print(f"AE run {run.url}: resuming step {ckpt['step']} at world size {dist_.world} (checkpoint written "
                  f"at {ckpt.get('world_size', 1)}): same images and draws per step, different reduction order")


def _build(cfg: AETrainConfig, storage_options: dict | None, device: torch.device) -> _Parts:
    """The phase's model (seeded: the same weights on every rank), trainable parameters, c' sampling, AdamW,
    discriminator (seeded apart), EMA and LPIPS, on ``device``.

    Raises:
        ValueError: a fixed or structured c' the AE's latent cannot give.
    """
    model = place(_build_model(cfg, storage_options), device).train()
    params = trainable_parameters(model, cfg.phase)
    sampling = _channel_sampling(cfg, model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    disc = disc_opt = None
    if cfg.w_gan > 0:
        torch.manual_seed(cfg.seed + 1)
        disc = place(NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers), device).train()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    ema = EMA(model.net, buffers=True) if cfg.ema_decay else None  # buffers: BatchNorm statistics too
    return _Parts(model, params, sampling, opt, disc, disc_opt, ema, _build_lpips(cfg, device))


def _channel_sampling(cfg: AETrainConfig, model: StructuredAutoencoder) -> ChannelSampling | None:
    """The c' each step decodes: one fixed c' (decoder_finetune), Eq. 1's draws (structured), or None."""
    if cfg.finetune_channels is not None:
        if cfg.finetune_channels > model.latent_channels:
            raise ValueError(f"AETrainConfig.finetune_channels={cfg.finetune_channels} exceeds the AE's "
                             f"{model.latent_channels} latent channels")
        return ChannelSampling(choices=(cfg.finetune_channels,))  # one fixed c' every step
    if not cfg.structured:
        return None
    choices = cfg.channel_choices or model.channel_choices
    if not choices:
        raise ValueError(f"AETrainConfig.structured=True but {model.config.name} has no channel_choices; "
                         "set channel_choices or structured=False")
    if max(choices) > model.latent_channels:
        raise ValueError(f"channel_choices {choices} exceed the AE's {model.latent_channels} latent channels")
    return ChannelSampling(choices=choices, mode=cfg.channel_mode, per_step=cfg.channels_per_step,
                           include_full=cfg.include_full)


class _AEStep:
    """One step of an AE phase on this rank's images ``x``: the autoencoder (encode once, decode once per c',
    L1 + LPIPS averaged over the c', + the hinge GAN generator loss), clipping, AdamW and EMA; then the
    discriminator on the detached reconstructions. DDP (several ranks) wraps the AE's forward and the
    discriminator. Returns (loss, logged parts, the c' list, lr), device tensors: no host sync."""

    def __init__(self, cfg: AETrainConfig, parts: _Parts, dist_: _Dist) -> None:
        self.cfg, self.p = cfg, parts
        self.recon = _ddp(_Reconstruct(parts.model), dist_)
        self.disc_ddp = _ddp(parts.disc, dist_) if parts.disc is not None else None
        self.rows = slice(dist_.rank * cfg.batch_size // dist_.world, (dist_.rank + 1) * cfg.batch_size // dist_.world)
        device = dist_.device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=cfg.bf16 and (gpu_branches(device) or cfg.bf16_on_cpu))

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict, list, float]:
        cfg, p = self.cfg, self.p
        gen = step_generator(cfg.seed, step, salt=1)
        channel_list = [_local(ch, self.rows) for ch in p.sampling.draw(gen, cfg.batch_size)] if p.sampling else [None]
        lr = lr_at(step, cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, total_steps=cfg.steps)
        for g in p.opt.param_groups:
            g["lr"] = lr
        use_gan = p.disc is not None and step >= cfg.gan_start_step

        # -- autoencoder step: encode once, decode once per c' (Eq. 1), average the losses
        with self.autocast:
            recons = self.recon(x, channel_list)
            loss, logs = 0.0, {}
            for y in recons:
                rec, parts = ae_loss(x, y, w_l1=cfg.w_l1, w_lpips=cfg.w_lpips, lpips_net=p.lpips)
                loss = loss + rec / len(channel_list)
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + v / len(channel_list)
            if use_gan:
                p.disc.requires_grad_(False)  # the generator loss trains the AE only (and skips DDP's hooks)
                g_loss = hinge_g_loss(p.disc(torch.cat(recons)))
                p.disc.requires_grad_(True)
                loss = loss + cfg.w_gan * g_loss
                logs["gan_g"] = g_loss.detach()
        p.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here, overlapped with the backward pass
        if cfg.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(p.params, cfg.grad_clip)
        p.opt.step()
        if p.ema is not None:
            p.ema.update(cfg.ema_decay)
        if use_gan:
            logs["gan_d"] = self._disc_step(x, recons, step)
        return loss, logs, channel_list, lr

    def _disc_step(self, x: torch.Tensor, recons: list[torch.Tensor], step: int) -> torch.Tensor:
        """The discriminator's step on the detached reconstructions: real and fake in one (DDP) call."""
        cfg, p = self.cfg, self.p
        for g in p.disc_opt.param_groups:
            g["lr"] = lr_at(step, cfg.disc_lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                            total_steps=cfg.steps)
        fake = torch.cat(recons).detach()
        with self.autocast:
            logits = self.disc_ddp(torch.cat([x, fake.to(x.dtype)]))  # GroupNorm: per-sample, so batching is exact
            d_loss = hinge_d_loss(logits[: x.shape[0]], logits[x.shape[0]:])
        p.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        p.disc_opt.step()
        return d_loss.detach()


def _finish(cfg: AETrainConfig, run: RunDir, parts: _Parts, dist_: _Dist, cfg_fp: str, last: dict,
            storage_options: dict | None) -> dict[str, Any]:
    """The finished phase: rank 0 saves the model (the EMA weights when on) with ``save_pretrained``, then the
    done marker (last); every rank returns it."""
    model, ema = parts.model, parts.ema
    if dist_.rank == 0:
        if ema is not None:
            model.net.load_state_dict({k: v.to(model.net.state_dict()[k].dtype) for k, v in ema.state_dict().items()})
        model.cpu().eval()
        model.save_pretrained(run.child(AE_MODEL), storage_options=storage_options)
        pointer = {"run_url": run.url, "model_url": run.child(AE_MODEL), "fingerprint": model.fingerprint(),
                   "name": model.config.name, "latent_channels": model.latent_channels,
                   "spatial_compression": model.spatial_compression, "steps": cfg.steps, "phase": cfg.phase,
                   "config_fingerprint": cfg_fp, "finished": True, "loss": last.get("loss"),
                   "seconds": last.get("sec"), "world_size": dist_.world}
        run.finish(pointer)  # last: the run is finished once this exists
    dist_.barrier()
    return run.done()


# ---------------------------------------------------------------------------------------------------------------
# CLI (torchrun entry point)
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m dcae15.ae.train --config launch.yaml`` (also under ``torchrun --nproc-per-node N``).

    launch.yaml holds ``dataset_url``, ``run_url``, ``train:`` (``AETrainConfig`` fields) and optionally
    ``storage_options``; the flow writes it into the run directory.
    """
    import argparse
    import os

    import yaml

    from storage.urls import read_bytes

    ap = argparse.ArgumentParser(description="Train one autoencoder phase (DDP under torchrun, resumable).")
    ap.add_argument("--config", required=True, help="YAML run file: dataset_url, run_url, train")
    ap.add_argument("--stop-at", type=int, default=None, help="leave after checkpointing this step (resumable)")
    args = ap.parse_args(argv)
    doc = yaml.safe_load(read_bytes(args.config)) or {}
    missing = [k for k in ("dataset_url", "run_url") if k not in doc]
    if missing:
        raise ValueError(f"{args.config}: missing {missing}; it needs dataset_url, run_url and train")
    cfg = AETrainConfig.from_dict(doc.get("train") or {})
    out = train_autoencoder(cfg, doc["dataset_url"], doc["run_url"], stop_at=args.stop_at,
                            storage_options=doc.get("storage_options"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
