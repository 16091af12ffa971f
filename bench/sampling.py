"""Benchmark sampling throughput: ``sample_to_store`` on 1 vs N processes (torchrun, gloo on CPU / nccl on GPU).

A tiny run (USiT-tiny on a random store decoded by a tiny-f8c32 autoencoder) is trained for a few steps, then the
same sample store is drawn by 1 and by N processes launched the same way (torchrun), and the stores are checked to
be identical. Reports wall-clock img/s of each launch (startup included) and of the sampling itself (the launch
minus a 1-unit launch's time, which is startup + model loading), and the speed-up.

Example:
    python bench/sampling.py --procs 2 --num-samples 256 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(nproc: int, run: str, out: str, spec: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all child processes) of one torchrun launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "dcae15.diffusion.sample", run, out, "--spec", json.dumps({**spec, "progress": False})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    import torch

    from bench.train_step import synthetic_store
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion
    from storage.sample_store import SampleStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps (Euler, CFG 1.5)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-sample-")
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32")
    ae_url = ae.save_pretrained(os.path.join(tmp, "ae"))
    # the store names its AE: sampling decodes with it (fingerprint checked)
    store = synthetic_store(os.path.join(tmp, "store"), 512, (32, 4, 4),
                            attrs={"ae_fingerprint": ae.fingerprint(), "ae_url": ae_url})
    run = train_diffusion(DiffusionTrainConfig(model="USiT-tiny", global_batch_size=32, steps=2, progress=False),
                          store, os.path.join(tmp, "run"))["run_url"]
    spec = {"num_samples": args.num_samples, "sampler": "euler", "steps": args.steps, "cfg_scale": 1.5, "seed": 0,
            "batch_size": args.batch, "chunk_size": args.batch, "ae_url": ae_url}
    startup, startup_cpu = _launch(1, run, os.path.join(tmp, "warm"), {**spec, "num_samples": args.batch})
    runs = {n: _launch(n, run, os.path.join(tmp, f"p{n}"), spec) for n in (1, args.procs)}
    walls = {n: r[0] for n, r in runs.items()}
    a, b = (SampleStore.open(os.path.join(tmp, f"p{n}")).read_all()[0] for n in (1, args.procs))
    out = {"num_samples": args.num_samples, "sampler_steps": args.steps, "batch": args.batch,
           "identical_stores": bool(np.array_equal(a, b)), "one_unit_launch_s": round(startup, 2)}
    for n, (wall, cpu) in runs.items():
        # CPU seconds per image beyond a 1-unit launch (n startups): the work the split adds, load-independent
        out[f"cpu_s_per_img_{n}proc"] = round((cpu - n * startup_cpu) / (args.num_samples - n * args.batch), 4)
        out[f"wall_s_{n}proc"] = round(wall, 2)
        out[f"img_s_{n}proc_wall"] = round(args.num_samples / wall, 2)
        # minus a 1-unit launch (startup + loading + one unit): the sampling rate itself, roughly
        out[f"img_s_{n}proc_excl_startup"] = round((args.num_samples - args.batch) / max(wall - startup, 1e-9), 2)
    out["speedup_wall"] = round(walls[1] / walls[args.procs], 3)
    out["speedup_excl_startup"] = round(out[f"img_s_{args.procs}proc_excl_startup"] / out["img_s_1proc_excl_startup"], 3)
    out["load"] = os.getloadavg()
    out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
