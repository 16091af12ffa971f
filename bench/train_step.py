"""Benchmark one diffusion training step (FSDP2, any preset): step time, img/s, tokens/s, MFU on GPU; ADT ratio.

Examples:
    python bench/train_step.py --model DiT-tiny --batch 32 --latent 32 4 4            # CPU, ADT vs baseline
    torchrun --nproc_per_node 1 bench/train_step.py --model USiT-H --batch 256 --latent 128 8 8 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from dcae15.diffusion.adt import ADTConfig, diffusion_loss
from dcae15.diffusion.objectives import make_objective
from dcae15.diffusion_train import _flops_per_image, _init_distributed
from dcae15.models import build_model, model_config, preset
from dcae15.parallel import apply_parallelism


def bench(model_name: str, batch: int, latent: tuple[int, int, int], adt: ADTConfig, *, steps: int, warmup: int,
          compile: bool, ac: bool, device: torch.device, ws: int, peak: float | None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    c, h, w = latent
    mcfg = model_config(model_name, in_channels=c, input_size=(h, w))
    torch.manual_seed(0)
    model = build_model(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    apply_parallelism(model, mesh=init_device_mesh(device.type, (ws,)), device=device, mixed_precision="bf16",
                      activation_checkpointing=ac, compile=compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    obj = make_objective(preset(model_name).objective)
    chans = adt.resolve(c) if adt.enabled else [c]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, c, h, w, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t, t, tgt = obj.prepare(x0, noise, torch.rand(batch, generator=gen).to(device))
        loss, _ = diffusion_loss(model, x_t, t, y, tgt, adt, chans, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # median
    img_s = batch * ws / step
    passes = 2 if adt.enabled and adt.include_full else 1
    out = {"model": model_name, "params_M": round(n_params / 1e6, 2), "batch_per_rank": batch, "latent": latent,
           "adt": "off" if not adt.enabled else f"{adt.mode}{'+full' if adt.include_full else ''}",
           "step_s": round(step, 5), "steps_per_s": round(1 / step, 2), "img_per_s": round(img_s, 1),
           "tokens_per_s": round(img_s * h * w), "compile": compile, "device": str(device)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if peak:
        out["mfu"] = round(img_s * _flops_per_image(mcfg, h * w, n_params, passes) / (peak * ws), 4)
    return out


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, ws, device, _ = _init_distributed()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (989e12 if device.type == "cuda" and any(
        k in torch.cuda.get_device_name(device) for k in ("H100", "H200")) else None)
    results = []
    for mode in args.modes.split(","):
        adt = ADTConfig(enabled=False) if mode == "off" else ADTConfig(mode=mode.split("+")[0],
                                                                        include_full=mode.endswith("+full"))
        results.append(bench(args.model, args.batch, tuple(args.latent), adt, steps=args.steps, warmup=args.warmup,
                             compile=args.compile, ac=args.ac, device=device, ws=ws, peak=peak))
    base = results[0]["step_s"]
    if rank == 0:
        for r in results:
            r["step_time_ratio_vs_first"] = round(r["step_s"] / base, 3)
            print(json.dumps(r))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
