"""Sample a trained diffusion run into a resumable uint8 sample store, decoding with the store's autoencoder.

Under ``torchrun`` every process takes its share of the missing units (unit u goes to rank ``u mod world``
among the missing ones), so N GPUs sample N times as fast and each unit is written by exactly one rank; the
images depend only on (seed, unit, batch), never on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from dcae15.diffusion.checkpoint import checkpoint_url, load_ema_state, read_latest, read_run_config
from dcae15.diffusion.objectives import make_objective
from dcae15.diffusion.samplers import SAMPLERS, sample_latents
from dcae15.metrics.labels import make_labels  # the one label rule: samples and their evaluation agree
from dcae15.models.registry import build_model, config_from_dict
from dcae15.parallel import place
from dcae15.pixels import to_uint8_nhwc
from storage.fingerprint import fingerprint
from storage.lease import rank_zero_claim

__all__ = ["DEFAULT_SAMPLER", "PRECISIONS", "load_run_model", "denormalize", "sample_to_store", "main"]

DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "heun"}
PRECISIONS = ("auto", "bf16", "fp32")


def _autocast(device: torch.device, precision: str):
    """bf16 autocast for the backbone and the decoder ('auto' = bf16 where the GPU branches are taken: on a GPU,
    or under DCAE15_GPU_BRANCHES=1; fp32 on CPU, where bf16 matmuls are slow); the samplers' updates stay fp32
    (the models' outputs are cast back)."""
    from dcae15.accel import bf16_autocast

    return bf16_autocast(device, precision)


def _unit_seed(seed: int, unit: int, batch: int) -> int:
    return int(fingerprint(["sample", seed, unit, batch]), 16) % 2**63


def _distributed(device: torch.device | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, created): a process group when run under torchrun (or one already live); the GPU is
    made current before it (``dcae15.distributed.init_distributed``)."""
    from dcae15.distributed import init_distributed

    use_cuda = device is None or torch.device(device).type == "cuda"
    rank, world, local, created = init_distributed(use_cuda=use_cuda, single_process_group=False)
    return rank, world, torch.device(device) if device is not None else local, created


def _resolve_checkpoint(run_url: str, checkpoint, storage_options) -> tuple[int, str]:
    if checkpoint is None:
        ptr = read_latest(run_url, storage_options)
        if ptr is None:
            raise FileNotFoundError(f"diffusion run {run_url!r} has no checkpoint yet ('latest' missing)")
        return int(ptr["step"]), ptr["checkpoint"]
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
        return int(checkpoint), checkpoint_url(run_url, int(checkpoint))
    return -1, str(checkpoint)  # an explicit checkpoint URL


def load_run_model(run_url: str, *, checkpoint: int | str | None = None, ema: bool = True,
                   device: torch.device | str = "cpu", storage_options: dict | None = None):
    """(model in eval mode, run config dict, step) for a run's checkpoint (latest by default), EMA weights."""
    conf = read_run_config(run_url, storage_options)
    step, url = _resolve_checkpoint(run_url, checkpoint, storage_options)
    model = build_model(config_from_dict(conf["model_config"]))  # a preset, or a plug-in by import path
    load_ema_state(url, model, which="ema" if ema else "model", storage_options=storage_options)
    return place(model, device).eval(), conf, step


def denormalize(z: torch.Tensor, norm: dict) -> torch.Tensor:
    """Undo the reader's normalisation (recorded in the run's config.yaml) to get raw AE latents."""
    mode = norm["mode"]
    if mode == "scaling_factor":
        return z / float(norm["scaling_factor"])
    if mode == "channel_stats":
        mean = torch.tensor(norm["channel_mean"], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(norm["channel_std"], dtype=z.dtype, device=z.device).clamp_min(1e-8).view(1, -1, 1, 1)
        return z * std + mean
    return z


def _load_ae(conf: dict, ae_url: str | None, device, storage_options):
    from dcae15.ae.model import StructuredAutoencoder

    url = ae_url or conf.get("ae_url")
    if not url:
        raise ValueError("the run's latent store records no 'ae_url'; pass ae_url= to decode the samples")
    ae = StructuredAutoencoder.from_pretrained(url, storage_options=storage_options)
    fp = ae.fingerprint()
    if fp != conf["ae_fingerprint"]:
        raise ValueError(f"autoencoder at {url!r} has fingerprint {fp!r} but the run was trained on latents of "
                         f"{conf['ae_fingerprint']!r}; decode with the store's autoencoder")
    return place(ae, device).eval()


@torch.no_grad()
def sample_to_store(run_url: str, out_url: str, *, num_samples: int, sampler: str | None = None, steps: int = 50,
                    cfg_scale: float = 1.0, seed: int = 0, checkpoint: int | str | None = None,
                    guidance_interval: tuple[float, float] = (0.0, 1.0), labels: str = "uniform",
                    classes: list[int] | None = None, batch_size: int = 64, chunk_size: int = 256, ema: bool = True, ae_url: str | None = None,
                    shift: float = 1.0, atol: float = 1e-5, rtol: float = 1e-5,
                    device: str | torch.device | None = None, precision: str = "auto", progress: bool = True,
                    storage_options: dict | None = None) -> str:
    """Generate ``num_samples`` images into the sample store at ``out_url``; a rerun writes only missing units.

    Every unit's noise comes from a generator on the sampling device seeded by (seed, unit, batch), so a resumed
    job, or one run on any number of processes, writes the same images an uninterrupted one-process job would
    (on the same kind of device: CPU and CUDA generators draw different numbers). Under torchrun each rank
    samples its share of the missing units.

    Args:
        run_url: a diffusion run directory.
        sampler: 'ddpm'/'ddim' (epsilon models) or 'euler'/'heun'/'dopri5'/'sde' (flow); None = ddpm / heun.
        steps: sampler steps (respaced DDPM steps, ODE steps, SDE model evaluations); ignored by dopri5.
        shift: flow models' timestep shift (``dcae15.diffusion.samplers.shift_time``); 1 = none.
        atol, rtol: dopri5's tolerances (DC-Gen's USiT evaluation: 1e-6, 1e-3).
        cfg_scale, guidance_interval: classifier-free guidance and its normalised-time window (1 = noise).
        checkpoint: step number, checkpoint URL, or None for ``latest``.
        labels: 'uniform' or 'balanced' class labels (over ``classes`` when given), or 'given': ``classes`` in
            order, each over a contiguous block (``dcae15.metrics.labels.make_labels``).
        classes: class ids to sample (None: all).
        ae_url: override the autoencoder location recorded in the store (its fingerprint is still checked).
        device: None = this rank's GPU (LOCAL_RANK) if there is one, else the CPU.
        precision: 'auto' (bf16 autocast on a GPU or under DCAE15_GPU_BRANCHES=1, else fp32), 'bf16' or 'fp32',
            for backbone and decoder.

    Returns:
        ``out_url``.
    """
    if num_samples < 1 or batch_size < 1 or chunk_size < 1:
        raise ValueError(f"num_samples, batch_size, chunk_size must be >= 1; got {num_samples}, {batch_size}, "
                         f"{chunk_size}")
    lo, hi = (float(v) for v in guidance_interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval={guidance_interval!r} must satisfy 0 <= lo <= hi <= 1")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {PRECISIONS}")
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0 (1 = no timestep shift)")
    rank, world, device, created = _distributed(None if device is None else torch.device(device))
    try:
        with rank_zero_claim(out_url, what="sample store", storage_options=storage_options):  # one writer per store
            return _sample(run_url, out_url, num_samples, sampler, steps, cfg_scale, seed, checkpoint, (lo, hi),
                           (labels, None if classes is None else [int(c) for c in classes]), batch_size, chunk_size,
                           ema, ae_url, device, precision, progress, storage_options, rank, world, shift=float(shift),
                           tol=(float(atol), float(rtol)))
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _sample(run_url, out_url, num_samples, sampler, steps, cfg_scale, seed, checkpoint, interval, labels, batch_size,
            chunk_size, ema, ae_url, device, precision, progress, storage_options, rank, world, *,
            shift: float = 1.0, tol: tuple[float, float] = (1e-5, 1e-5)) -> str:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from dcae15.accel import enable_speed_switches
    from dcae15.distributed import io_barrier, new_io_group
    from storage.sample_store import SampleStore

    enable_speed_switches(device, conv=True)  # TF32 for fp32 sampling; cuDNN autotuning for the decoder's convs

    model, conf, step = load_run_model(run_url, checkpoint=checkpoint, ema=ema, device=device,
                                       storage_options=storage_options)
    objective = make_objective(conf["objective"])
    sampler = sampler or DEFAULT_SAMPLER[objective.kind]
    if sampler not in SAMPLERS[objective.kind]:
        raise ValueError(f"sampler {sampler!r} does not fit a {objective.kind} model; allowed: "
                         f"{SAMPLERS[objective.kind]}")
    mc = conf["model_config"]
    ae = _load_ae(conf, ae_url, device, storage_options)
    res = int(conf.get("resolution") or mc["input_size"][0] * ae.spatial_compression)
    lo, hi = interval
    labels, classes = labels
    # the store records what it holds: run, backbone, checkpoint, latent store; nothing parses ids back apart
    spec = {"run_id": conf["run_id"], "backbone": conf["train"]["model"], "store_id": conf["store_id"],
            "checkpoint_step": step, "sampler": sampler, "steps": int(steps),
            "cfg_scale": float(cfg_scale), "guidance_interval": [lo, hi], "seed": int(seed), "labels": labels,
            **({"classes": classes} if classes is not None else {}), "ema": bool(ema), "ae_fingerprint": conf["ae_fingerprint"],
            **({"shift": shift} if shift != 1.0 else {}),  # absent at 1: an unshifted store keeps its fingerprint
            **({"atol": tol[0], "rtol": tol[1]} if sampler == "dopri5" and tol != (1e-5, 1e-5) else {})}

    def create():
        return SampleStore.create(out_url, num_samples=num_samples, height=res, width=res, chunk_size=chunk_size,
                                  attrs={**spec, "spec_fingerprint": fingerprint(spec),
                                         "sample_id": out_url.rstrip("/").rsplit("/", 1)[-1]},  # its folder
                                  storage_options=storage_options)

    # waits behind I/O (rank 0 creating the store, the final barrier behind the slowest rank's units, which can
    # take longer than NCCL's timeout) are on a gloo group with the long I/O timeout
    io = new_io_group() if world > 1 else None
    if world > 1:  # rank 0 creates the store and lists what is missing; the others follow its view
        store = create() if rank == 0 else None
        msg = [store.missing_units() if rank == 0 else None]
        dist.broadcast_object_list(msg, src=0, group=io)
        if store is None:
            store = SampleStore.open(out_url, storage_options=storage_options)
        missing = msg[0][rank::world]
    else:
        store = create()
        missing = store.missing_units()
    all_labels = make_labels(num_samples, mc["num_classes"], labels, seed, classes)
    shape = (mc["in_channels"], *mc["input_size"])
    for unit in tqdm(missing, desc=f"sample units (rank {rank}/{world})", disable=not progress):
        a, b = store.unit_bounds(unit)
        images = []
        for i, s in enumerate(range(a, b, batch_size)):
            y = torch.from_numpy(all_labels[s:min(b, s + batch_size)]).long().to(device)
            gen = torch.Generator(device=device).manual_seed(_unit_seed(seed, unit, i))
            with _autocast(device, precision):
                z = sample_latents(model, objective, shape=(len(y), *shape), labels=y, sampler=sampler,
                                   steps=steps, generator=gen, cfg_scale=cfg_scale, guidance_interval=(lo, hi),
                                   null_class=mc["num_classes"], shift=shift, atol=tol[0], rtol=tol[1],
                                   device=device)
                images.append(to_uint8_nhwc(ae.decode(denormalize(z.float(), conf["latent_norm"]))))
        # the marker says who drew the unit: rank, and torchrun's node rank (GROUP_RANK) across nodes
        store.write_unit(unit, np.concatenate(images), all_labels[a:b],
                         writer={"rank": rank, "world": world, "node": int(os.environ.get("GROUP_RANK", 0))})
    if io is not None:
        io_barrier(io)  # the store is complete when every rank returns
        dist.destroy_process_group(io)
    return out_url


def main(argv: list[str] | None = None) -> str:
    """``python -m dcae15.diffusion.sample RUN OUT --spec '{"num_samples": 50000, ...}'`` (also under torchrun)."""
    ap = argparse.ArgumentParser(description="Sample a diffusion run into a resumable sample store.")
    ap.add_argument("run_url")
    ap.add_argument("out_url")
    ap.add_argument("--spec", default="{}", help="JSON of sample_to_store keyword arguments")
    ap.add_argument("--checkpoint", default=None, help="step number or checkpoint URL (default: latest)")
    args = ap.parse_args(argv)
    kw = json.loads(args.spec)
    if args.checkpoint is not None:
        kw["checkpoint"] = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    kw.setdefault("progress", int(os.environ.get("RANK", "0")) == 0)
    out = sample_to_store(args.run_url, args.out_url, **kw)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out_url": out}))
    return out


if __name__ == "__main__":
    main()
