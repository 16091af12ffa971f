"""Benchmark: peak RSS of the evaluation of a sample store at two sample counts (flat = streamed, not held).

For each count N a sample store of N images at ``--size`` px with 1000 class labels is written once; then each
measurement runs in a fresh process (so ``ru_maxrss`` is its own peak):

- ``evaluate``: what the evaluation flow does with a store (``flows.evaluate.score_samples`` and
  ``draw_run_figures``): generation metrics (FID / IS / precision / recall, torch-fidelity) over the store read
  unit by unit, and the run's sample grid (a bounded class set, picked unit by unit) for 1000 class names;
- ``read_all`` (the baseline, what ``draw_run_figures`` did before issue 22): ``SampleStore.read_all()``.

The feature network is a ProxyNet with random weights in the proxy's real file format (Inception runs at ~1 img/s
on one shared CPU core here: 20 000 images would take hours). The per-sample features the metrics keep are
``feature_dim + num_classes`` floats per image (64 + 1000 here; Inception: 2048 + 1008 = 12 KB, i.e. 0.24 GB at
20 000) against 196 KB of pixels per 256 px image.

Example:
    python bench/eval_memory.py --counts 2000 20000 --size 256
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
NUM_CLASSES = 1000


def make_store(url: str, n: int, size: int) -> None:
    """N images with a per-unit smooth pattern (compressible: the store stays small on disk) and uniform labels."""
    from storage.sample_store import SampleStore

    store = SampleStore.create(url, num_samples=n, height=size, width=size, attrs={"bench": True}, chunk_size=256)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for u in store.missing_units():
        a, b = store.unit_bounds(u)
        base = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5 + np.array([0, 40, 80])) % 256
        imgs = np.repeat(base[None], b - a, axis=0)
        imgs += (np.arange(b - a, dtype=np.float32) % 37)[:, None, None, None]
        store.write_unit(u, np.clip(imgs, 0, 255).astype(np.uint8), rng.integers(0, NUM_CLASSES, b - a))


def proxy_spec(folder: str):
    """A random-weight ProxyNet in the proxy's file format, as a torch-fidelity feature extractor spec."""
    import torch

    from dcae15.metrics.extractor import PROXY_NAME, FeatureExtractorSpec, ProxyNet

    path = os.path.join(folder, "proxy-bench.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        net = ProxyNet(NUM_CLASSES, width=16, resolution=32)
        torch.save({"config": {"width": 16, "resolution": 32}, "num_classes": NUM_CLASSES,
                    "state_dict": net.state_dict()}, path)
    return FeatureExtractorSpec(name=PROXY_NAME, label="proxy-bench", prefix="proxy-", fingerprint="bench",
                                weights_path=path, layers={"fid": "features", "isc": "logits", "prc": "features",
                                                           "kid": "features"})


def measure(mode: str, url: str, folder: str) -> dict:
    """One measurement in this process: wall seconds and peak RSS (MiB)."""
    t0 = time.perf_counter()
    if mode == "read_all":
        from storage.sample_store import SampleStore

        images, _ = SampleStore.open(url, read_only=True).read_all()
        extra = {"bytes": int(images.nbytes)}
    else:
        from dcae15.diffusion.plots import collect_grid_images, grid_classes, sample_grid_png
        from dcae15.metrics.fidelity import extract_features, feature_stats, generation_metrics
        from dcae15.metrics.reference import ReferenceStats
        from storage.sample_store import SampleStore

        spec = proxy_spec(folder)
        ref_imgs = np.random.default_rng(1).integers(0, 255, (512, 32, 32, 3), dtype=np.uint8)
        feats = extract_features(ref_imgs, spec, families=("fid",))["fid"].numpy()
        mu, sigma = feature_stats(feats)
        ref = ReferenceStats(mu=mu, sigma=sigma, features=feats,
                             attrs={"extractor_fingerprint": spec.fingerprint, "layer": spec.layers["fid"]})
        values = generation_metrics(url, ref, extractor=spec)
        store = SampleStore.open(url, read_only=True)
        names = [f"n{i:08d}" for i in range(NUM_CLASSES)]
        rows = grid_classes(NUM_CLASSES)
        imgs, labels = collect_grid_images(store.iter_units(), rows)
        png = sample_grid_png(imgs, labels, names, classes=rows)
        extra = {"metrics": {k: round(v, 4) for k, v in values.items()}, "grid_png_bytes": len(png)}
    return {"mode": mode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    ap.add_argument("--one", nargs=3, metavar=("MODE", "URL", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    folder = args.dir or tempfile.mkdtemp(prefix="eval-memory-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    stores = {}
    for n in args.counts:
        stores[n] = os.path.join(folder, f"samples-{n}-{args.size}px")
        t0 = time.perf_counter()
        make_store(stores[n], n, args.size)
        print(f"store of {n} images at {args.size} px ready in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for mode in ("evaluate", "read_all"):  # interleaved per count: the same load for both counts of a mode
        for n in args.counts:
            out = subprocess.run([sys.executable, __file__, "--one", mode, stores[n], folder], env=env, cwd=REPO,
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            row = {"num_samples": n, **json.loads(out.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["mode"], r["num_samples"]): r["peak_rss_mib"] for r in results}
    lo, hi = min(args.counts), max(args.counts)
    for mode in ("evaluate", "read_all"):
        print(f"{mode}: peak RSS {by[(mode, lo)]} MiB at {lo} -> {by[(mode, hi)]} MiB at {hi} "
              f"(ratio {by[(mode, hi)] / by[(mode, lo)]:.2f} for {hi / lo:.0f}x the samples)")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
