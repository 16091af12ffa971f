"""One rank, side by side: the trainer vs the project's bare loop vs the reference DiT training loop.

Three loops on the same network (dcae15's DiT/U-ViT at the given shape), device, batch and thread count, measured
alternately in one process (the order rotates every repeat, so the machine's load hits all alike):

- ``trainer``: ``train_diffusion`` on a synthetic store (reader, prefetch, device noise, clipping, EMA, NaN guard,
  metrics, checkpoint machinery), at one rank the plain module (no FSDP2);
- ``trainer_fsdp`` (``--fsdp``): the same with ``fsdp_one_rank=True``, the FSDP2-wrapped path one rank took before;
- ``trainer_ema_every`` (``--ema-every K``): the trainer with ``ema_every=K`` (the EMA pass every K steps);
- ``bare``: ``bench/train_step.py``'s bare loop (forward + backward + the trainer's fused AdamW, batch resident);
- ``reference``: the training loop of facebookresearch/DiT ``train.py`` (Peebles & Xie, CC-BY-NC; reproduced here
  from its published structure, no code copied) without DDP: AdamW(lr=1e-4, weight_decay=0) with torch's default
  implementation, ``t ~ randint(0, 1000)``, the DDPM ε-MSE loss, ``zero_grad`` / ``backward`` / ``step``, its
  per-parameter EMA loop (``mul_(decay).add_(p, alpha=1 - decay)``) and ``loss.item()`` every step. Its data comes
  from a resident batch (the reference's loader and VAE encoding are left out: a best case for it). Its ε-loss
  has no learned-σ / VB term: the network is the project's, so that only the loop differs.

Wall-clock ratios are the median over repeats of same-repeat ratios (``*_pairwise_median``); ``cpu_time_*`` are
ratios of the training thread's CPU time per step (load-independent on a shared machine).

Examples:
    python bench/train_one_rank.py --model SiT-tiny --patch 2 --latent 8 8 8 --batch 64           # the demo's shape
    python bench/train_one_rank.py --model DiT-tiny --size S --patch 2 --latent 32 8 8 --batch 8   # DiT-S width
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time

import torch

from bench.train_step import SIZES, bare_loop, synthetic_store, trainer_run
from dcae15.models import build_model, model_config
from dcae15.parallel import place


def reference_loop(mcfg, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(img/s, thread CPU s per step) of the reference DiT ``train.py`` loop (see the module docstring) on a
    resident batch."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = place(build_model(mcfg), device)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DiT's linear schedule
    abar = torch.cumprod(1 - betas, 0).float().to(device)
    c, (h, w) = mcfg.in_channels, mcfg.input_size
    x = torch.randn(batch, c, h, w, device=device)
    y = torch.randint(0, mcfg.num_classes, (batch,), device=device)
    ema_p, model_p = dict(ema.named_parameters()), dict(model.named_parameters())
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(x_t, t.float(), y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for name, p in model_p.items():
                ema_p[name].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        loss.item()  # the reference's running-loss sync, every step
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0), (time.thread_time() - c0) / steps


def _median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SiT-tiny")
    ap.add_argument("--size", default=None, choices=sorted(SIZES), help="DiT-S/B widths on the preset")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--latent", type=int, nargs=3, default=(8, 8, 8), metavar=("C", "H", "W"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--fsdp", action="store_true", help="also the trainer with fsdp_one_rank=True")
    ap.add_argument("--ema-every", type=int, default=None, metavar="K",
                    help="also the trainer with ema_every=K (the EMA pass every K steps, decay**K)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    overrides = SIZES.get(args.size, {})
    latent = tuple(args.latent)
    mcfg = model_config(args.model, in_channels=latent[0], input_size=latent[1:], patch_size=args.patch,
                        num_classes=10, **overrides)
    tmp = tempfile.mkdtemp(prefix="bench-one-rank-")
    store = synthetic_store(os.path.join(tmp, "store"), max(2048, 4 * args.batch), latent)
    run = os.path.join(tmp, "run")

    def trainer(**kw) -> tuple[float, float]:
        return trainer_run(store, run, args.model, overrides, args.batch, args.steps, args.warmup,
                           patch_size=args.patch, cpu_threads=args.threads, **kw)[:2]

    loops = {"bare": lambda: bare_loop(mcfg, args.batch, args.steps, args.warmup, device),
             "trainer": trainer,
             "reference": lambda: reference_loop(mcfg, args.batch, args.steps, args.warmup, device)}
    if args.fsdp:
        loops["trainer_fsdp"] = lambda: trainer(fsdp_one_rank=True)
    if args.ema_every:
        loops["trainer_ema_every"] = lambda: trainer(ema_every=args.ema_every)
    names = list(loops)
    res: dict[str, list[float]] = {k: [] for k in names}  # img/s
    cpu: dict[str, list[float]] = {k: [] for k in names}  # training-thread CPU s per step
    for k in names:  # one untimed round: first-call costs (allocator, lazy inits, the store's page cache)
        loops[k]()
    load0 = os.getloadavg()
    for i in range(args.repeats):
        for k in names[i % len(names):] + names[:i % len(names)]:  # rotate the order
            img_s, cpu_s = loops[k]()
            res[k].append(img_s)
            cpu[k].append(cpu_s)
    shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a: str, b: str) -> float:
        return round(_median([x / y for x, y in zip(res[a], res[b])]), 3)

    out = {"model": args.model + (f" ({args.size} width)" if overrides else ""),
           "params_M": round(sum(p.numel() for p in build_model(mcfg).parameters()) / 1e6, 2),
           "latent": latent, "patch": args.patch, "batch": args.batch, "threads": args.threads,
           "device": str(device), "steps": args.steps, "repeats": args.repeats,
           **{f"{k}_img_s": round(_median(v), 1) for k, v in res.items()},
           "trainer_over_bare_pairwise_median": ratio("trainer", "bare"),
           "trainer_over_reference_pairwise_median": ratio("trainer", "reference"),
           "bare_over_reference_pairwise_median": ratio("bare", "reference"),
           **({"trainer_fsdp_over_trainer_pairwise_median": ratio("trainer_fsdp", "trainer")} if args.fsdp else {}),
           # speed ratios from the training thread's CPU time per step: blind to other processes' load (the
           # trainer's reader / prefetch thread is not counted: on a free core it overlaps the step)
           **{f"{k}_thread_cpu_ms_per_step": round(1e3 * _median(v), 2) for k, v in cpu.items()},
           "cpu_time_trainer_over_bare": round(_median(cpu["bare"]) / _median(cpu["trainer"]), 3),
           "cpu_time_trainer_over_reference": round(_median(cpu["reference"]) / _median(cpu["trainer"]), 3),
           **({"cpu_time_trainer_fsdp_over_trainer": round(_median(cpu["trainer"]) / _median(cpu["trainer_fsdp"]), 3)}
              if args.fsdp else {}),
           **({"ema_every": args.ema_every,
               "cpu_time_trainer_ema_every_over_bare": round(_median(cpu["bare"]) / _median(cpu["trainer_ema_every"]), 3),
               "cpu_time_trainer_ema_every_over_reference": round(
                   _median(cpu["reference"]) / _median(cpu["trainer_ema_every"]), 3)} if args.ema_every else {}),
           "all": {k: [round(x, 1) for x in v] for k, v in res.items()},
           "load_start": load0, "load_end": os.getloadavg()}
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
