"""Benchmark the trainer's own diffusion step (FSDP2, any preset): median / p90 ms, img/s, MFU on GPU; ADT ratio.

The timed step is ``dcae15.diffusion.train.TrainStep`` (device-generator noise, fused AdamW, fused clip + NaN
guard, EMA); MFU = analytic FLOPs (``dcae15.models.flops``) x img/s / the dense bf16 datasheet peak (H100 / H200
989 TFLOP/s) or ``--peak-tflops``; none on CPU.

``--overhead``: the trainer's img/s (``train_diffusion`` on a store: reader, prefetch, device noise, clipping,
EMA, bookkeeping, async checkpoint) against a bare loop of the same model's forward + backward + AdamW step on the
same device and batch, measured alternately in one process; the analytic FLOPs checked against
``torch.utils.flop_counter`` on a meta-device model; MFU on GPU (on CPU a labelled fraction of this machine's
measured fp32 GEMM rate instead); and a cProfile of the trainer's thread: the share of its time spent waiting for
the next batch.

Examples:
    python bench/train_step.py --model DiT-tiny --batch 32 --latent 32 4 4            # CPU, ADT vs baseline
    python bench/train_step.py --overhead --model DiT-tiny --batch 32 --latent 32 4 4
    python bench/train_step.py --overhead --model DiT-tiny --size S --batch 16 --latent 32 4 4   # DiT-S width
    torchrun --nproc_per_node 1 bench/train_step.py --model USiT-H --batch 256 --latent 128 8 8 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from dcae15.accel import dense_bf16_peak_flops, forced_gpu_branches
from dcae15.diffusion.objectives import make_objective
from dcae15.diffusion.train import DiffusionTrainConfig, _flops_per_image, _init_distributed, train_flops_per_image
from dcae15.models import build_model, model_config, preset
from dcae15.models.flops import train_flops_per_image_analytic
from dcae15.parallel import apply_parallelism


def time_trainer_step(cfg, latent: tuple[int, int, int], device: torch.device, *, steps: int, warmup: int,
                      peak: float | None, world_size: int = 1, deadline: float | None = None) -> dict:
    """Time the trainer's own optimizer step (``TrainStep``: device-generator noise / t / dropout / c' draws, the
    ADT loss, fused clip + NaN guard, fused AdamW, EMA) on a batch resident on the device, FSDP2-wrapped with the
    trainer's policy (``cfg.compile`` / ``cfg.activation_checkpointing``).

    Per step: device time from CUDA events (no host sync inside the timed loop; on CPU wall time), and the
    training thread's CPU time (host work per step: what must stay below the device time). The first ``warmup``
    steps are not timed; their extra time over the median is reported as ``compile_s`` (compile, autotuning).
    MFU uses the analytic FLOPs (``dcae15.models.flops``) against ``peak`` (the dense bf16 datasheet peak).
    ``deadline`` (``time.monotonic()``) stops the timed loop early (at least 2 steps).
    """
    from dcae15.diffusion.objectives import make_objective
    from dcae15.diffusion.train import TrainStep, build_training_model, make_optimizer
    from dcae15.ema import EMA
    from dcae15.models.flops import train_flops_per_image_analytic

    c, h, w = latent
    mcfg = model_config(cfg.model, in_channels=c, input_size=(h, w), patch_size=cfg.patch_size,
                        **cfg.model_overrides)
    batch = cfg.global_batch_size // world_size
    if cfg.compile:
        torch._dynamo.reset()  # each batch size compiles fresh: the graph the trainer builds, its compile time
    model, sharded = build_training_model(cfg, mcfg, device, world_size)  # the trainer's own set-up and placement
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, cfg)
    chans = cfg.adt.resolve(c) if cfg.adt.enabled else [c]
    gen = torch.Generator(device=device).manual_seed(0)
    step_fn = TrainStep(model, opt, EMA(model), make_objective(cfg.objective_name), gen, cfg, chans,
                        mcfg.num_classes, c, 1, device, sharded=sharded)
    x0 = torch.randn(batch, c, h, w, device=device)
    y = torch.randint(0, mcfg.num_classes, (batch,), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step_fn(x0, y, i)
    if cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0
    times, host = [], []
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)] \
        if cuda else []
    for i in range(steps):
        if deadline is not None and i >= 2 and time.monotonic() > deadline:
            break
        c0, w0 = time.thread_time(), time.perf_counter()
        if cuda:
            events[i][0].record()
        loss, _, _ = step_fn(x0, y, warmup + i)
        if cuda:
            events[i][1].record()
        else:
            times.append(time.perf_counter() - w0)
        host.append(time.thread_time() - c0)
    if cuda:
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in events[:len(host)]]
    med, p90 = quantile(times, 0.5), quantile(times, 0.9)
    img_s = batch * world_size / med
    passes = 2 if cfg.adt.enabled and cfg.adt.include_full else 1
    flops = train_flops_per_image_analytic(mcfg, passes)
    out = {"model": cfg.model, "params_M": round(n_params / 1e6, 2), "batch": cfg.global_batch_size,
           "batch_per_rank": batch, "latent": list(latent), "patch": cfg.patch_size,
           "compile": cfg.compile, "forced_gpu_branches": forced_gpu_branches(),  # forced: every run compiles
           "activation_checkpointing": cfg.activation_checkpointing,
           "fsdp": sharded,
           "adt": "off" if not cfg.adt.enabled else f"{cfg.adt.mode}{'+full' if cfg.adt.include_full else ''}",
           "steps_timed": len(times), "median_ms": round(1e3 * med, 3), "p90_ms": round(1e3 * p90, 3),
           "img_per_s": round(img_s, 1), "host_ms_per_step": round(1e3 * quantile(host, 0.5), 3),
           "compile_s": round(max(0.0, warm_s - warmup * med), 2), "train_gflop_per_img": round(flops / 1e9, 3),
           "loss_finite": bool(torch.isfinite(loss)), "device": str(device)}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if peak:
        out["mfu"] = round(img_s * flops / (peak * world_size), 4)
    return out


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


SIZES = {"S": {"hidden": 384, "depth": 12, "heads": 6}, "B": {"hidden": 768, "depth": 12, "heads": 12}}


def synthetic_store(url: str, n: int, latent: tuple[int, int, int], num_classes: int = 10,
                    attrs: dict | None = None) -> str:
    """A finalized store of random fp16 latents with flips, written through storage's API."""
    import numpy as np

    from storage.latent_store import LatentStore

    c, h, w = latent
    st = LatentStore.create(url, num_samples=n, channels=c, height=h, width=w, flip=True, chunk_size=256,
                            attrs={"ae_fingerprint": "bench", "dataset_fingerprint": "bench", "resolution": h * 8,
                                   "ae_scaling_factor": 1.0, "num_classes": num_classes, **(attrs or {})})
    rng = np.random.default_rng(0)
    for u in range(st.num_units):
        a, b = st.unit_bounds(u)
        lat = rng.standard_normal((b - a, c, h, w)).astype(np.float32)
        st.write_unit(u, lat, rng.integers(0, num_classes, b - a), np.ones(b - a, bool), lat[..., ::-1])
    st.finalize()
    return url


def bare_loop(mcfg, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(img/s, thread CPU s per step) of the same model's forward + backward + AdamW step (the plain module, as
    the trainer runs it at one rank; batch resident on the device)."""
    import torch.nn.functional as F

    from dcae15.diffusion.train import DiffusionTrainConfig, make_optimizer
    from dcae15.parallel import make_mesh

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(mcfg)
        apply_parallelism(model, mesh=make_mesh(device, 1), device=device, mixed_precision="bf16", shard=False)
        opt = make_optimizer(model, DiffusionTrainConfig())  # the trainer's optimizer (AdamW, fused), same settings
        obj = make_objective(preset("DiT-tiny").objective)
        c, (h, w) = mcfg.in_channels, mcfg.input_size
        x0 = torch.randn(batch, c, h, w, device=device)
        y = torch.randint(0, mcfg.num_classes, (batch,), device=device)
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.thread_time()
            x_t, t, tgt = obj.prepare(x0, torch.randn_like(x0), torch.rand(batch, device=device))
            F.mse_loss(model(x_t, t, y), tgt).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0), (time.thread_time() - c0) / steps
    finally:
        if created:
            dist.destroy_process_group()


def trainer_run(store: str, run: str, model: str, overrides: dict, batch: int, steps: int, warmup: int,
                profile: bool = False, **train_kw) -> tuple[float, float, dict]:
    """(img/s, training-thread CPU s per step, profile info) of ``train_diffusion`` after its first ``warmup``
    steps (metrics rows of ``warmup`` steps each); ``train_kw``: further DiffusionTrainConfig fields."""
    import cProfile
    import pstats
    import shutil

    from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion

    shutil.rmtree(run, ignore_errors=True)
    windows = max(1, steps // warmup)
    cfg = DiffusionTrainConfig(model=model, model_overrides=overrides, global_batch_size=batch,
                               steps=warmup * (windows + 1), log_every=warmup, checkpoint_every=10**9,
                               adt={"enabled": False}, progress=False, **train_kw)
    from dcae15.diffusion import data

    waits: list[float] = []
    real_next = data.DevicePrefetcher.__next__

    def timed_next(self):
        t0 = time.perf_counter()
        try:
            return real_next(self)
        finally:
            waits.append(time.perf_counter() - t0)

    prof = cProfile.Profile() if profile else None
    data.DevicePrefetcher.__next__ = timed_next
    if prof:
        prof.enable()
    try:
        train_diffusion(cfg, store, run)
    finally:
        if prof:
            prof.disable()
        data.DevicePrefetcher.__next__ = real_next
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")).read().splitlines()][1:]
    img_s = len(rows) * warmup * batch / sum(warmup * batch / r["img_per_s"] for r in rows)
    cpu_step = sum(r["thread_cpu_s_per_step"] for r in rows) / len(rows)
    info = {}
    if prof:
        st = pstats.Stats(prof)
        total = next(v[3] for k, v in st.stats.items() if k[2] == "_train")
        wait = sum(v[3] for k, v in st.stats.items() if k[2] == "__next__" and k[0].endswith("data.py"))
        reader = sum(v[3] for k, v in st.stats.items() if k[0].endswith(os.path.join("storage", "reader.py")))
        after = sum(waits[warmup:])  # the first batches wait for the store to open and the first units to load
        info = {"train_loop_s": round(total, 3), "waiting_for_batches_s": round(wait, 4),
                "waiting_share": round(wait / total, 4), "waiting_after_warmup_s": round(after, 4),
                "waiting_after_warmup_share": round(after / total, 5),
                "reader_code_on_training_thread_s": round(reader, 4)}
    return img_s, cpu_step, info


def per_parameter_work(mcfg, device: torch.device, reps: int = 5) -> dict:
    """Median time of the trainer's per-parameter passes that a bare loop does not have (EMA update, gradient
    clipping) next to AdamW's step: memory-bound, independent of the batch, so their share shrinks as the batch
    (tokens per step) grows."""
    from dcae15.ema import EMA
    from dcae15.parallel import make_mesh

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build_model(mcfg)
        apply_parallelism(model, mesh=make_mesh(device, 1), device=device, mixed_precision="bf16", shard=False)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        from dcae15.diffusion.train import DiffusionTrainConfig, make_optimizer

        ema, opt = EMA(model), make_optimizer(model, DiffusionTrainConfig())

        clock = time.perf_counter if device.type == "cuda" else time.thread_time  # CPU: blind to other load

        def timed(fn) -> float:
            ts = []
            for _ in range(reps):
                t0 = clock()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(clock() - t0)
            return sorted(ts)[reps // 2]

        from dcae15.diffusion.train import _clip_and_guard

        return {"ema_update_ms": round(1e3 * timed(lambda: ema.update(0.9999)), 2),
                "grad_norm_clip_guard_ms": round(1e3 * timed(lambda: _clip_and_guard(model, opt, 1.0)), 2),
                "adamw_step_ms": round(1e3 * timed(opt.step), 2)}
    finally:
        if created:
            dist.destroy_process_group()


def gemm_flops(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 matmul FLOP/s: the CPU's 'peak' for an MFU figure (no datasheet number on CPU). Per CPU
    second of this thread on CPU, so that other processes' load does not move it."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t0 = clock()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (clock() - t0)


def overhead(args) -> None:
    import tempfile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads or 1)
    overrides = SIZES.get(args.size, {})
    latent = tuple(args.latent)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    store = synthetic_store(os.path.join(tmp, "store"), max(2048, 4 * args.batch), latent)
    mcfg = model_config(args.model, in_channels=latent[0], input_size=latent[1:], num_classes=10, **overrides)
    # FLOPs: the closed form (instant at any size; counting a real forward + backward of DiT-XL on CPU took tens
    # of minutes) vs torch's counter on a meta-device model (what the trainer logs) and the 6NT rule of thumb.
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(mcfg).parameters())
    counted = train_flops_per_image_analytic(mcfg)
    trainer_flops = train_flops_per_image(mcfg, args.batch)
    formula = _flops_per_image(mcfg, latent[1] * latent[2], n_params, 1)
    bare, trainer, bare_cpu, trainer_cpu = [], [], [], []
    for i in range(args.repeats):  # alternate (and swap the order), so the machine's load hits both alike
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                r = bare_loop(mcfg, args.batch, args.steps, args.warmup, device)
                bare.append(r[0])
                bare_cpu.append(r[1])
            else:
                r = trainer_run(store, os.path.join(tmp, "run"), args.model, overrides, args.batch, args.steps,
                                args.warmup)
                trainer.append(r[0])
                trainer_cpu.append(r[1])
    _, _, prof = trainer_run(store, os.path.join(tmp, "run"), args.model, overrides, args.batch, args.steps,
                          args.warmup, profile=True)
    b, t = sorted(bare)[len(bare) // 2], sorted(trainer)[len(trainer) // 2]
    parts = per_parameter_work(mcfg, device)
    parts["bare_step_ms"] = round(1e3 * args.batch / b, 1)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else dense_bf16_peak_flops(device)
    if peak:  # MFU against the dense bf16 datasheet peak (or --peak-tflops)
        mfu = {"mfu_trainer": round(t * counted / peak, 4), "mfu_bare": round(b * counted / peak, 4)}
    else:  # CPU: no datasheet peak; a fraction of this machine's measured fp32 GEMM rate per CPU second of the
        # training thread (load-independent), labelled as such: not an MFU
        peak = gemm_flops(device)
        tc, bc = (sorted(v)[len(v) // 2] for v in (trainer_cpu, bare_cpu))
        mfu = {"gemm_fraction_trainer_cpu_time": round(args.batch * counted / tc / peak, 4),
               "gemm_fraction_bare_cpu_time": round(args.batch * counted / bc / peak, 4)}
    out = {"model": args.model + (f" ({args.size} width)" if overrides else ""), "params_M": round(n_params / 1e6, 2),
           "batch": args.batch, "latent": latent, "device": str(device), "threads": torch.get_num_threads(),
           "bare_img_s": round(b, 1), "trainer_img_s": round(t, 1), "trainer_over_bare": round(t / b, 3),
           # each pair was measured back to back: the median of their ratios resists the load drifting between pairs
           "trainer_over_bare_pairwise_median": round(sorted(x / y for x, y in zip(trainer, bare))[len(bare) // 2], 3),
           "all_bare": [round(v, 1) for v in bare], "all_trainer": [round(v, 1) for v in trainer],
           # training-thread CPU time per step: insensitive to other processes on a shared machine (on CPU it
           # includes the compute; the reader and prefetch threads are not counted, they overlap the step)
           "bare_thread_cpu_ms_per_step": round(1e3 * sorted(bare_cpu)[len(bare_cpu) // 2], 2),
           "trainer_thread_cpu_ms_per_step": round(1e3 * sorted(trainer_cpu)[len(trainer_cpu) // 2], 2),
           "cpu_time_ratio_bare_over_trainer": round(sorted(bare_cpu)[len(bare_cpu) // 2]
                                                     / sorted(trainer_cpu)[len(trainer_cpu) // 2], 3),
           "flops_per_img_analytic": counted, "flops_per_img_counter_meta": trainer_flops,
           "counter_over_analytic": round(trainer_flops / counted, 4),
           "rule_of_thumb_6NT_over_analytic": round(formula / counted, 3),
           "peak_flops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else (
               "datasheet dense bf16" if dense_bf16_peak_flops(device) else "measured fp32 GEMM")
           **mfu, **prof, **parts,
           "load": os.getloadavg()}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-tiny")
    ap.add_argument("--batch", type=int, default=32, help="per-rank batch")
    ap.add_argument("--latent", type=int, nargs=3, default=(32, 4, 4), metavar=("C", "H", "W"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU (H100 bf16 dense: 989)")
    ap.add_argument("--modes", default="off,per_batch,per_batch+full",
                    help="comma list of ADT modes: off, per_batch, per_sample, per_batch+full")
    ap.add_argument("--overhead", action="store_true", help="trainer vs bare loop (see the module docstring)")
    ap.add_argument("--size", default=None, choices=sorted(SIZES), help="--overhead: DiT-S/B widths on the preset")
    ap.add_argument("--repeats", type=int, default=3, help="--overhead: alternating repeats (median)")
    args = ap.parse_args()
    if args.overhead:
        overhead(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, ws, device, _ = _init_distributed()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else dense_bf16_peak_flops(device)
    results = []
    for mode in args.modes.split(","):
        adt = {"enabled": False} if mode == "off" else {"mode": mode.split("+")[0],
                                                         "include_full": mode.endswith("+full")}
        cfg = DiffusionTrainConfig(model=args.model, global_batch_size=args.batch * ws, adt=adt,
                                   compile=args.compile, activation_checkpointing=args.ac, progress=False)
        results.append(time_trainer_step(cfg, tuple(args.latent), device, steps=args.steps, warmup=args.warmup,
                                         peak=peak, world_size=ws))
    base = results[0]["median_ms"]
    if rank == 0:
        for r in results:
            r["step_time_ratio_vs_first"] = round(r["median_ms"] / base, 3)
            r["load"] = os.getloadavg()
            print(json.dumps(r))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
