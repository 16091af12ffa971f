"""Benchmark: AE training throughput — 2 torchrun (gloo) processes vs 1 on CPU, the trainer's step vs a bare
forward/backward on pre-decoded tensors (is decoding kept ahead of the step?), and the FLOP-counted extrapolation of
the paper's recipe for DC-AE-1.5-f32c128 at 256 px on 8 H100s.

Run: .venv/bin/python bench/ae_train.py [--steps 40 --batch 16 --preset tiny-f8c32 --size 32]
     .venv/bin/python bench/ae_train.py --only extrapolate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def _dataset(tmp: Path, size: int, n_per_class: int) -> str:
    from storage.shards import pack_image_folder
    from storage.synthetic import make_shapes_dataset

    make_shapes_dataset(str(tmp / "src"), num_classes=8, per_class=n_per_class, size=size, seed=0)
    pack_image_folder(str(tmp / "src"), str(tmp / "packed"), progress=False)
    return str(tmp / "packed")


def _img_per_s(run: Path, batch: int, skip: int) -> float:
    """Images/s between logged step ``skip`` and the last step (the warm-up steps excluded)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    a, b = rows[skip - 1], rows[-1]
    return batch * (b["step"] - a["step"]) / (b["sec"] - a["sec"])


def _train_cfg(args, **over) -> dict:
    return {**dict(preset=args.preset, resolution=args.size, steps=args.steps, batch_size=args.batch, lr=1e-4,
                   perceptual="none", checkpoint_every=args.steps, log_every=1, progress=False), **over}


def scaling(args, ds: str, tmp: Path) -> None:
    """1 process with batch B vs 2 gloo processes with B each (global 2B): img/s of the same trainer."""
    import yaml

    from flows.launch import torchrun_command

    out = {}
    for nproc in (1, 2):
        f = tmp / f"launch-{nproc}.yaml"
        run = tmp / f"scale-{nproc}"
        f.write_text(yaml.safe_dump({"dataset_url": ds, "run_url": str(run),
                                     "train": _train_cfg(args, batch_size=args.batch * nproc)}))
        cmd = torchrun_command("dcae15.ae.train", ["--config", str(f)], nproc_per_node=nproc)
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[nproc] = _img_per_s(run, args.batch * nproc, skip=5)
    print(f"scaling  {args.preset} @ {args.size}px, {args.batch} img/rank/step, {args.steps} steps, gloo, 1 thread/rank")
    print(f"         1 process {out[1]:7.1f} img/s | 2 processes {out[2]:7.1f} img/s | ratio {out[2] / out[1]:.2f}x")


def loader_vs_bare(args, ds: str, tmp: Path) -> None:
    """The trainer's step with its data path (prefetch thread, or DataLoader workers) vs the same trainer fed one
    pre-decoded tensor (``_batches`` replaced): the ratio bare/step is how well decoding is kept ahead."""
    import dcae15.ae.train as T

    res: dict[str, float] = {}
    for rep in range(args.repeats):  # interleaved repeats, best of each: the machine is shared and its load drifts
        for label, over in (("thread", dict(num_workers=0)), ("workers", dict(num_workers=args.workers)),
                            ("bare", {})):
            cfg = T.AETrainConfig(**_train_cfg(args, **over))
            real = T._batches
            if label == "bare":
                from dcae15.ae.data import ImageBatches
                from storage.shards import open_dataset

                fixed = ImageBatches(open_dataset(ds), batch_size=cfg.batch_size, resolution=cfg.resolution,
                                     prefetch=False).batch(0)
                T._batches = lambda cfg, batches, start, end, device, workers: (fixed for _ in range(start, end))
            try:
                T.train_autoencoder(cfg, ds, str(tmp / f"lb-{label}-{rep}"))
            finally:
                T._batches = real
            res[label] = max(res.get(label, 0.0), _img_per_s(tmp / f"lb-{label}-{rep}", args.batch, skip=5))
    print(f"loader   {args.preset} @ {args.size}px batch {args.batch}, best of {args.repeats} interleaved: bare fwd/bwd on a pre-decoded tensor "
          f"{res['bare']:7.1f} img/s")
    for k in ("thread", "workers"):
        extra = f" ({args.workers} DataLoader worker(s))" if k == "workers" else " (in-process decode, I/O thread)"
        print(f"         trainer{extra:34s} {res[k]:7.1f} img/s | step-time ratio bare/trainer {res[k] / res['bare']:.3f}")


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def extrapolate(args) -> None:
    """FLOPs per image of each phase's training step (counted on the meta device, nothing allocated), then the
    recipe's GPU time on 8 H100s at an assumed model-FLOPs utilisation. NO GPU was available to measure it."""
    from dcae15.ae.discriminator import NLayerDiscriminator
    from dcae15.ae.recipe import PAPER_PHASES
    from dcae15.ae.train import trainable_parameters
    from dcae15.ae.model import StructuredAutoencoder

    with torch.device("meta"):
        ae = StructuredAutoencoder.from_preset("dc-ae-f32c128-1.5")
        disc = NLayerDiscriminator(3, 64, 3)
    n_params = sum(p.numel() for p in ae.parameters())
    # LPIPS-VGG: the torchvision VGG16 trunk (lpips' 5 slices); its own weights frozen, gradients to the input
    import torchvision

    with torch.device("meta"):
        vgg = torchvision.models.vgg16().features[:30].requires_grad_(False)
    print(f"extrapolate  dc-ae-f32c128-1.5: {n_params / 1e6:.0f} M parameters "
          f"(encoder {sum(p.numel() for p in ae.net.encoder.parameters()) / 1e6:.0f} M)")
    total_s, h100, mfu, gpus = 0.0, 989e12, args.mfu, 8
    for ph in PAPER_PHASES:
        res = ph["resolution"]
        trainable_parameters(ae, ph["phase"])
        x = torch.randn(1, 3, res, res, device="meta")

        def step():
            y = ae.decode(ae.encode(x), channels=64)
            loss = y.abs().mean() + vgg(y).mean()  # L1 + LPIPS (its trunk; the linear heads are negligible)
            if ph.get("w_gan", 0) > 0:
                disc.requires_grad_(False)
                loss = loss + disc(y).mean()
                disc.requires_grad_(True)
            loss.backward()
            if ph.get("w_gan", 0) > 0:  # discriminator step on real + fake
                disc(torch.cat([x, y.detach()])).mean().backward()

        f_img = _flops(step)
        images = ph["steps"] * ph["batch_size"]
        secs = images * f_img / (gpus * h100 * mfu)
        total_s += secs
        print(f"  {ph['name']:22s} {res}px: {f_img / 1e12:6.2f} TFLOP/img x {ph['steps']} steps x {ph['batch_size']} img"
              f" = {images * f_img:.3e} FLOP / ({gpus} x {h100 / 1e12:.0f} TFLOP/s x MFU {mfu}) = {secs / 3600:6.1f} h")
    print(f"  recipe total: {total_s / 3600:.1f} h on {gpus} H100 (bf16 dense peak {h100 / 1e12:.0f} TFLOP/s, assumed "
          f"MFU {mfu}); no GPU was available: not measured")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-f8c32")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.35)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("scaling", "loader", "extrapolate"), default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-ae-") as d:
        tmp = Path(d)
        ds = _dataset(tmp, args.size, 64) if args.only != "extrapolate" else ""
        t = time.perf_counter()
        if args.only in (None, "scaling"):
            scaling(args, ds, tmp)
        if args.only in (None, "loader"):
            loader_vs_bare(args, ds, tmp)
        if args.only in (None, "extrapolate"):
            extrapolate(args)
        print(f"(bench wall time {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
