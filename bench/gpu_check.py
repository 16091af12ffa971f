"""The GPU check: one command, <= 8 minutes on one H100/H200, one flushed JSON line per section, in priority order.

    bash bench/gpu_check.sh                   # on the GPU machine, from the root of a copied tree: no install
    bash bench/gpu_check.sh --cpu-smoke       # every section at tiny sizes on CPU (CI rehearses the GPU machine)

``bench/gpu_check.sh`` puts the repository root on ``PYTHONPATH`` and installs the wheels that
``scripts/fetch_gpu_wheels.sh`` prepared (what the GPU image lacks) into a temporary folder; this file can also
be run directly where dcae15 is importable.

Sections (each with its own deadline; a section that runs out prints what it has with "status": "timeout", one
that fails prints "status": "error" and the next one runs):
  env        torch / CUDA / NCCL versions, the device, the process group (backend, device_id, timeouts), TF32 flags,
             an all-reduce of a device and of a CPU tensor;
  timesteps  the timestep dtype and values a model sharded under the bf16 FSDP2 policy really sees;
  dit_step   DiT-XL on 128x8x8 latents (patch 1; --patch 2: DiT-XL/2) with the trainer's own set-up and step
             (``build_training_model``, ``TrainStep``: device noise, fused AdamW, clip + NaN guard, EMA), eager vs
             compiled (each batch size compiled fresh, static shapes), batch 32 and 256, plus the FSDP2-sharded
             step at one rank (``fsdp_one_rank``): median / p90 ms, img/s, MFU against the dense bf16 peak
             (analytic FLOPs), peak GiB, host ms per step, compile s;
  train_e2e  ``train_diffusion`` end to end on a synthetic store: the plain module with an async checkpoint,
             then a resume of it as an FSDP2-sharded model (``fsdp_one_rank``) that saves a sharded checkpoint;
  encode     the f32c128-1.5 encoder at 256 px, bf16 vs fp32: img/s and the bf16 latents' relative error;
  sampling   sampling img/s: DDPM 50 steps (DiT) and Heun with a guidance interval (SiT), bf16 autocast; decode img/s;
  ae_step    one f32c128-1.5 AE training step at 256 px (L1 + LPIPS, bf16 autocast): seconds and peak GiB;
  reader     the latent reader's feed rate to the device (DataLoader + pinned prefetch) against the step rate.

Weights are random (speed and dtype behaviour do not depend on them). ``--cpu-smoke`` sets DCAE15_GPU_BRANCHES=1
(the CPU takes the GPU branches) and DCAE15_COMPILE_BACKEND=aot_eager unless they are set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]  # bench/ helpers (train_step), then the repository root (dcae15)


class SectionTimeout(Exception):
    """A section ran past its deadline."""


@dataclass(frozen=True)
class Sizes:
    """What each section runs at."""

    model: str
    overrides: dict
    latent: tuple[int, int, int]
    batches: tuple[int, ...]
    steps: int
    warmup: int
    e2e_model: str
    e2e_overrides: dict
    e2e_steps: int
    e2e_batch: int
    store_n: int
    ae_preset: str
    resolution: int
    enc_batch: int
    enc_reps: int
    sample_model: str
    sample_overrides: dict
    sample_batch: int
    ddpm_steps: int
    heun_steps: int
    ae_batch: int
    reader_batch: int
    reader_batches: int
    reader_workers: int
    deadlines: dict


GPU = Sizes(model="DiT-XL", overrides={}, latent=(128, 8, 8), batches=(32, 256), steps=30, warmup=3,
            e2e_model="DiT-XL", e2e_overrides={"depth": 8}, e2e_steps=40, e2e_batch=256, store_n=16384,
            ae_preset="dc-ae-f32c128-1.5", resolution=256, enc_batch=64, enc_reps=5,
            sample_model="DiT-XL", sample_overrides={}, sample_batch=256, ddpm_steps=50, heun_steps=25,
            ae_batch=8, reader_batch=256, reader_batches=60, reader_workers=4,
            deadlines={"env": 30, "timesteps": 30, "dit_step": 200, "train_e2e": 75, "encode": 40, "sampling": 45,
                       "ae_step": 30, "reader": 25})
SMOKE = Sizes(model="DiT-tiny", overrides={"hidden": 32, "depth": 2, "heads": 2}, latent=(32, 4, 4), batches=(4, 8),
              steps=2, warmup=1, e2e_model="DiT-tiny", e2e_overrides={"hidden": 32, "depth": 2, "heads": 2},
              e2e_steps=4, e2e_batch=8, store_n=64, ae_preset="tiny-f8c32", resolution=32, enc_batch=4, enc_reps=2,
              sample_model="DiT-tiny", sample_overrides={"hidden": 32, "depth": 2, "heads": 2}, sample_batch=4,
              ddpm_steps=3, heun_steps=2, ae_batch=2, reader_batch=8, reader_batches=5, reader_workers=0,
              # generous: the smoke run proves the sections run; a loaded CI machine must not turn that flaky
              deadlines={"env": 60, "timesteps": 120, "dit_step": 300, "train_e2e": 300, "encode": 120,
                         "sampling": 120, "ae_step": 120, "reader": 120})


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise SectionTimeout in this (main) thread after ``seconds``."""
    def fire(*_):
        raise SectionTimeout(f"past its {seconds:.0f} s deadline")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ sections
def env_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    import torch.distributed as dist

    from dcae15.accel import compile_backend, dense_bf16_peak_flops, enable_speed_switches, gpu_branches
    from dcae15.distributed import IO_TIMEOUT_ENV, PG_TIMEOUT_ENV, group_timeout

    rec.update(torch=torch.__version__, cuda=torch.version.cuda, device=str(device), gpus=torch.cuda.device_count(),
               gpu_branches=gpu_branches(device), compile_backend=compile_backend(),
               pg_backend=str(dist.get_backend()), world_size=dist.get_world_size(),
               pg_timeout_s=group_timeout(PG_TIMEOUT_ENV).total_seconds(),
               io_timeout_s=group_timeout(IO_TIMEOUT_ENV).total_seconds())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory
                   / 2**30, 1), bf16=torch.cuda.is_bf16_supported(), nccl=str(torch.cuda.nccl.version()),
                   bf16_dense_peak_tflops=(dense_bf16_peak_flops(device) or 0) / 1e12)
    enable_speed_switches(device, conv=True)
    # the legacy getters inductor reads: they raise if the TF32 switches were set through both APIs
    rec.update(float32_matmul_precision=torch.get_float32_matmul_precision(),
               matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
               cudnn_benchmark=torch.backends.cudnn.benchmark)
    for where in ([device, torch.device("cpu")] if device.type == "cuda" else [device]):
        x = torch.ones(1 << 20, device=where)
        dist.all_reduce(x)  # warm-up (NCCL communicator / gloo pairs)
        sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(x)
        sync(device)
        rec[f"all_reduce_4MiB_{where.type}_ms"] = round(1e3 * (time.perf_counter() - t0), 3)


def timesteps_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    import torch.distributed as dist

    from dcae15.models import build_model, model_config
    from dcae15.parallel import apply_parallelism, forward_inputs_seen, make_mesh, mixed_precision_policy

    c, h, w = S.latent
    torch.manual_seed(0)
    model = build_model(model_config(S.model, in_channels=c, input_size=(h, w), **S.overrides))
    apply_parallelism(model, mesh=make_mesh(device, dist.get_world_size()), device=device, mixed_precision="bf16")
    mp = mixed_precision_policy(device, "bf16")
    t = torch.tensor([997.0, 998.0, 999.0, 501.0, 990.0, 999.75, 0.5, 3.25], device=device)
    n = t.numel()
    seen = forward_inputs_seen(model, torch.randn(n, c, h, w, device=device), t,
                               torch.zeros(n, dtype=torch.long, device=device))[1]
    rec.update(param_dtype=str(mp.param_dtype), reduce_dtype=str(mp.reduce_dtype), t_sent=t.tolist(),
               t_seen=seen.float().tolist(), t_seen_dtype=str(seen.dtype),
               max_abs_error=float((seen.float() - t).abs().max()),
               bf16_cast_would_give=t.bfloat16().float().tolist(), ok=bool(seen.dtype == torch.float32
                                                                             and torch.equal(seen, t)))


def _train_cfg(S: Sizes, model: str, overrides: dict, batch: int, **kw):
    from dcae15.diffusion.train import DiffusionTrainConfig

    return DiffusionTrainConfig(model=model, model_overrides=overrides, global_batch_size=batch, progress=False,
                                **kw)


def dit_step_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    import torch.distributed as dist

    from dcae15.accel import dense_bf16_peak_flops
    from train_step import time_trainer_step

    peak = dense_bf16_peak_flops(device)
    rec.update(model=S.model, latent=list(S.latent), runs=[],
               peak_flops=peak, peak_source="datasheet dense bf16" if peak else None)
    plain = [(compiled, batch, False) for compiled in (False, True) for batch in S.batches]
    for compiled, batch, fsdp in [*plain, (False, S.batches[0], True)]:  # + the sharded step at one rank
        cfg = _train_cfg(S, S.model, S.overrides, batch, compile=compiled, patch_size=ctx["patch"],
                         fsdp_one_rank=fsdp)
        r = time_trainer_step(cfg, S.latent, device, steps=S.steps, warmup=S.warmup, peak=peak,
                              world_size=dist.get_world_size(), deadline=ctx["deadline_at"])
        rec["runs"].append(r)
        if not fsdp and (compiled or "step_img_s" not in ctx):
            ctx["step_img_s"] = r["img_per_s"]  # the fastest configuration measured so far: what the reader feeds
    eager = {r["batch"]: r for r in rec["runs"] if not r["compile"] and not r["fsdp"]}
    rec["compiled_over_eager_img_s"] = {b: round(r["img_per_s"] / eager[b]["img_per_s"], 3)
                                        for b, r in ((r["batch"], r) for r in rec["runs"] if r["compile"])
                                        if b in eager}
    rec["fsdp_over_plain_img_s"] = {r["batch"]: round(r["img_per_s"] / eager[r["batch"]]["img_per_s"], 3)
                                    for r in rec["runs"] if r["fsdp"] and r["batch"] in eager}


def train_e2e_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    from dcae15.diffusion.train import train_diffusion
    from train_step import synthetic_store

    store = ctx.get("store") or synthetic_store(os.path.join(ctx["tmp"], "store"), S.store_n, S.latent)
    ctx["store"] = store
    run = os.path.join(ctx["tmp"], "run")
    half = S.e2e_steps // 2
    cfg = _train_cfg(S, S.e2e_model, S.e2e_overrides, S.e2e_batch, steps=S.e2e_steps, checkpoint_every=half,
                     log_every=max(1, half // 2), async_checkpoint=True)
    t0 = time.perf_counter()
    first = train_diffusion(cfg, store, run, max_steps=half)  # the plain module (one rank)
    t1 = time.perf_counter()
    # the same run resumed sharded: fsdp_one_rank is operational (same run id, same checkpoint format)
    second = train_diffusion(dataclasses.replace(cfg, fsdp_one_rank=True), store, run)
    t2 = time.perf_counter()
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")).read().splitlines()]
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(first["checkpoint"]) for f in fs)
    rec.update(model=S.e2e_model, overrides=S.e2e_overrides, batch=S.e2e_batch, steps=S.e2e_steps,
               first_call_s=round(t1 - t0, 2), resumed_sharded_call_s=round(t2 - t1, 2), resumed_at=first["step"],
               finished_step=second["step"], done=second["done"], checkpoint_gib=round(ckpt_bytes / 2**30, 3),
               img_per_s=[round(r["img_per_s"], 1) for r in rows], mfu=[r.get("mfu") for r in rows],
               loss=[round(r["loss"], 5) for r in rows], finite=all(map(lambda r: r["loss"] == r["loss"], rows)))


def encode_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    import numpy as np

    from dcae15.ae.encode import encode_images
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.parallel import place

    torch.manual_seed(0)
    enc = place(StructuredAutoencoder.from_preset(S.ae_preset).net.encoder, device).eval().requires_grad_(False)
    images = np.random.default_rng(0).integers(0, 256, (S.enc_batch, S.resolution, S.resolution, 3), dtype=np.uint8)
    rec.update(preset=S.ae_preset, resolution=S.resolution, batch=S.enc_batch)
    z = {}
    with torch.inference_mode():
        for dtype in ("float32", "bfloat16"):
            z[dtype] = encode_images(enc, images, device, dtype=dtype)  # warm-up (cuDNN autotuning)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(S.enc_reps):
                encode_images(enc, images, device, dtype=dtype)
            rec[f"{dtype}_img_s"] = round(S.enc_reps * S.enc_batch / (time.perf_counter() - t0), 1)
    a, b = z["float32"], z["bfloat16"]
    rec["bf16_over_fp32_img_s"] = round(rec["bfloat16_img_s"] / rec["float32_img_s"], 3)
    rec["bf16_latent_rel_error"] = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12))


def sampling_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    from dcae15.accel import bf16_autocast
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.diffusion.objectives import make_objective
    from dcae15.diffusion.samplers import sample_latents
    from dcae15.models import build_model, model_config
    from dcae15.parallel import place

    c, h, w = S.latent
    n = S.sample_batch
    torch.manual_seed(0)
    model = place(build_model(model_config(S.sample_model, in_channels=c, input_size=(h, w),
                                           **S.sample_overrides)), device).eval()
    y = torch.arange(n, device=device) % model.cfg.num_classes
    rec.update(model=S.sample_model, batch=n)
    runs = (("ddpm", "ddpm-linear", S.ddpm_steps, (0.0, 1.0)), ("heun", "flow", S.heun_steps, (0.2, 0.8)))
    z = None
    with torch.inference_mode(), bf16_autocast(device, "auto"):
        for sampler, objective, steps, interval in runs:
            kw = dict(shape=(n, c, h, w), labels=y, sampler=sampler, steps=steps, cfg_scale=1.5,
                      guidance_interval=interval, null_class=model.cfg.num_classes, device=device)
            sample_latents(model, make_objective(objective), generator=torch.Generator(device).manual_seed(0),
                           **{**kw, "steps": 1 if sampler == "ddpm" else 2})  # warm-up
            sync(device)
            t0 = time.perf_counter()
            z = sample_latents(model, make_objective(objective), generator=torch.Generator(device).manual_seed(1),
                               **kw)
            sync(device)
            rec[f"{sampler}_{steps}_img_s"] = round(n / (time.perf_counter() - t0), 1)
        rec["guidance_interval_heun"] = list(runs[1][3])
        ae = place(StructuredAutoencoder.from_preset(S.ae_preset), device).eval()
        if ae.latent_channels == c:
            ae.decode(z[:2].float())  # warm-up
            sync(device)
            t0 = time.perf_counter()
            ae.decode(z.float())
            sync(device)
            rec["decode_img_s"] = round(n / (time.perf_counter() - t0), 1)


def ae_step_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    from dcae15.accel import bf16_autocast
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.ae.train import _Reconstruct, ae_loss
    from dcae15.metrics.lpips_offline import build_lpips
    from dcae15.parallel import place

    torch.manual_seed(0)
    ae = place(StructuredAutoencoder.from_preset(S.ae_preset), device).train()
    lp = place(build_lpips("vgg", random_backbone=True), device)  # speed only: an un-pretrained trunk, no download
    recon = _Reconstruct(ae)
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=6.4e-5, weight_decay=0.1)
    x = torch.rand(S.ae_batch, 3, S.resolution, S.resolution, device=device) * 2 - 1
    reset_peak(device)
    times = []
    for _ in range(2):  # the first pays cuDNN autotuning
        t0 = time.perf_counter()
        with bf16_autocast(device, "auto"):
            out = recon(x, [None])
            loss, _ = ae_loss(x, out[0], w_l1=1.0, w_lpips=0.5, lpips_net=lp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    rec.update(preset=S.ae_preset, resolution=S.resolution, batch=S.ae_batch, first_step_s=round(times[0], 3),
               step_s=round(times[1], 3), img_per_s=round(S.ae_batch / times[1], 1), peak_gib=peak_gib(device),
               loss=float(loss.detach()))


def reader_section(rec: dict, S: Sizes, device: torch.device, ctx: dict) -> None:
    from torch.utils.data import DataLoader

    from dcae15.diffusion.data import DevicePrefetcher, RankBatches
    from storage.reader import LatentStreamDataset
    from train_step import synthetic_store

    store = ctx.get("store") or synthetic_store(os.path.join(ctx["tmp"], "store"), S.store_n, S.latent)
    ctx["store"] = store
    ds = LatentStreamDataset(store, batch_size=S.reader_batch, seed=0, infinite=True)
    loader = DataLoader(ds, batch_size=None, num_workers=S.reader_workers, pin_memory=device.type == "cuda")
    batches = DevicePrefetcher(RankBatches([(0, iter(loader), 0, S.reader_batch)]), device)
    try:
        next(batches)  # the store opens, the first units load
        sync(device)
        t0 = time.perf_counter()
        for _ in range(S.reader_batches):
            b = next(batches)
            b["latents"].sum()  # the batch is on the device
        sync(device)
        feed = S.reader_batches * S.reader_batch / (time.perf_counter() - t0)
    finally:
        batches.close()
    rec.update(batch=S.reader_batch, workers=S.reader_workers, feed_img_s=round(feed, 1))
    if ctx.get("step_img_s"):
        rec["step_img_s"] = ctx["step_img_s"]
        rec["feed_over_step"] = round(feed / ctx["step_img_s"], 2)  # > 1: the reader is never what the GPU waits for


def _caused_by_timeout(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, SectionTimeout) or "SectionTimeout" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


SECTIONS = (("env", env_section), ("timesteps", timesteps_section), ("dit_step", dit_step_section),
            ("train_e2e", train_e2e_section), ("encode", encode_section), ("sampling", sampling_section),
            ("ae_step", ae_step_section), ("reader", reader_section))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="every section at tiny sizes on CPU")
    ap.add_argument("--only", default=None, help="comma list of sections to run (default: all, in order)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--patch", type=int, default=1, choices=(1, 2),
                    help="dit_step patch size: 1 = 64 tokens on 8x8 latents (DC-AE's setting), 2 = DiT-XL/2")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        from dcae15.accel import COMPILE_BACKEND_ENV, GPU_BRANCHES_ENV

        os.environ.setdefault(GPU_BRANCHES_ENV, "1")
        os.environ.setdefault(COMPILE_BACKEND_ENV, "aot_eager")
        torch.set_num_threads(1)
    S = SMOKE if args.cpu_smoke else GPU
    wanted = [s for s, _ in SECTIONS] if args.only is None else args.only.split(",")
    unknown = set(wanted) - {s for s, _ in SECTIONS}
    if unknown:
        raise SystemExit(f"--only: unknown sections {sorted(unknown)}; allowed: {[s for s, _ in SECTIONS]}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --cpu-smoke")

    import torch.distributed as dist

    from dcae15.distributed import init_distributed

    t_start = time.perf_counter()
    # the heavy imports (diffusers, DCP, the reader) before the first deadline starts: no section pays for them
    import dcae15.ae.model  # noqa: F401
    import dcae15.diffusion.sample  # noqa: F401
    import dcae15.diffusion.train  # noqa: F401
    import storage.reader  # noqa: F401

    _, _, device, created = init_distributed(use_cuda=not args.cpu_smoke)
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    ctx: dict = {"tmp": tmp, "patch": args.patch}
    failures = 0
    out = open(args.out, "a") if args.out else None
    try:
        for name, fn in SECTIONS:
            if name not in wanted:
                continue
            limit = S.deadlines[name]
            rec: dict = {}
            t0 = time.perf_counter()
            ctx["deadline_at"] = time.monotonic() + 0.9 * limit  # loops stop early, leaving time to report
            status = "ok"
            try:
                with deadline(limit):
                    fn(rec, S, device, ctx)
            except SectionTimeout as e:
                status, rec["error"] = "timeout", str(e)
                failures += 1
            except Exception as e:  # noqa: BLE001 - report and go on to the next section
                # the alarm can fire inside the compiler, which wraps it (BackendCompilerFailed)
                status = "timeout" if _caused_by_timeout(e) else "error"
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                failures += 1
            line = json.dumps({"section": name, "status": status, "seconds": round(time.perf_counter() - t0, 2),
                               "deadline_s": limit, **rec}, default=str)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
        total = {"section": "total", "seconds": round(time.perf_counter() - t_start, 1), "failures": failures,
                 "load": os.getloadavg(), "cpu_smoke": args.cpu_smoke}
        print(json.dumps(total), flush=True)
        if out:
            out.write(json.dumps(total) + "\n")
    finally:
        if out:
            out.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
