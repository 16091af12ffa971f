"""Benchmark: encode images/s of dcae15's StructuredAutoencoder vs diffusers' AutoencoderDC (same config, same run),
plus tiny-preset training steps/s (what sizes the demo).

Run: .venv/bin/python bench/autoencoder.py [--preset tiny-f16c64 --size 64 --batch 16 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def _rate(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return batch / best


def main() -> None:
    from diffusers import AutoencoderDC

    from dcae15.ae.channels import ChannelSampling, step_generator
    from dcae15.ae.model import AE_PRESETS, StructuredAutoencoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-f16c64", choices=sorted(AE_PRESETS))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = StructuredAutoencoder.from_preset(args.preset).eval()
    ref = AutoencoderDC(**ours.config.diffusers_kwargs()).eval()
    ref.load_state_dict(ours.net.state_dict())
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(ours.encode(x), ref.encode(x).latent)
        r_ours = _rate(lambda: ours.encode(x), args.batch, args.repeats)
        r_ref = _rate(lambda: ref.encode(x).latent, args.batch, args.repeats)
        d_ours = _rate(lambda: ours.decode(ours.encode(x), channels=ours.channel_choices[0]), args.batch, args.repeats)
        d_ref = _rate(lambda: ref(x).sample, args.batch, args.repeats)
    print(f"{args.preset} @ {args.size}px, batch {args.batch}, {args.threads} thread(s), best of {args.repeats}")
    print(f"encode   dcae15 {r_ours:8.1f} img/s | diffusers AutoencoderDC.encode {r_ref:8.1f} img/s | ratio {r_ours / r_ref:.3f}")
    print(f"enc+dec  dcae15 (c'={ours.channel_choices[0]}) {d_ours:8.1f} img/s | diffusers forward {d_ref:8.1f} img/s | "
          f"ratio {d_ours / d_ref:.3f}")

    # training throughput of the tiny presets (L1, one c' per step, AdamW): what sizes the demo
    for name, size in (("tiny-f8c32", 32), ("tiny-f16c64", 64)):
        torch.manual_seed(0)
        ae = StructuredAutoencoder.from_preset(name).train()
        opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)
        sampling = ChannelSampling(choices=ae.channel_choices)
        for b in (16, 32):
            xb = torch.rand(b, 3, size, size) * 2 - 1
            state = {"step": 0}

            def step() -> None:
                c = sampling.draw(step_generator(0, state["step"]), b)[0]
                loss = (ae(xb, channels=c) - xb).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1

            sps = _rate(step, 1, args.repeats * 2)
            print(f"train    {name} @ {size}px batch {b}: {sps:6.2f} steps/s ({sps * b:7.1f} img/s)")


if __name__ == "__main__":
    main()
