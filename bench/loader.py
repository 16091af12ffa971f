"""Latent store benchmark: codec/sharding write+read MB/s, and streaming-reader samples/s against the same reader
fed from an in-memory numpy array in the same run (the ratio is what counts; goal >= 0.8).

    .venv/bin/python bench/loader.py                     # 102400 samples of 128x8x8 fp16 (1.6 GB) in /tmp
    .venv/bin/python bench/loader.py --samples 20000 --sweep-samples 4096   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from storage.latent_store import LatentStore
from storage.reader import LatentStreamDataset
from storage.units import CODECS

SHAPE = (128, 8, 8)  # f32c128 latents of 256 px images
ATTRS = {"ae_fingerprint": "bench", "dataset_fingerprint": "bench", "resolution": 256}


def latent_like(n: int, seed: int) -> np.ndarray:
    """Unit-scale fp16 values with per-channel offsets/scales and spatial correlation, like AE latents."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, SHAPE[0], 4, 4)).astype(np.float32)
    x = base.repeat(2, axis=2).repeat(2, axis=3) + 0.3 * rng.standard_normal((n, *SHAPE)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, (1, SHAPE[0], 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.5, 0.5, (1, SHAPE[0], 1, 1)).astype(np.float32)
    return (x * scale + shift).astype(np.float16)


def write_store(url: str, n: int, chunk: int, codec: str, inner: int, seed: int = 0) -> float:
    store = LatentStore.create(url, num_samples=n, channels=SHAPE[0], height=SHAPE[1], width=SHAPE[2], flip=False,
                               attrs=ATTRS, chunk_size=chunk, codec=codec, inner_chunks=inner)
    t0 = time.perf_counter()
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        store.write_unit(u, latent_like(b - a, seed + u), np.arange(a, b) % 1000, np.ones(b - a, bool))
    elapsed = time.perf_counter() - t0
    store.finalize()
    return elapsed


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def codec_sweep(root: str, n: int, chunk: int) -> list[dict]:
    rows = []
    gen = time.perf_counter()
    for u in range(-(-n // chunk)):
        latent_like(min(chunk, n - u * chunk), u)
    gen = time.perf_counter() - gen  # data generation time, subtracted from write times
    raw = n * 2 * int(np.prod(SHAPE))
    for codec in CODECS:
        for inner in (1, 8):
            url = os.path.join(root, f"sweep-{codec}-{inner}")
            w = write_store(url, n, chunk, codec, inner) - gen
            store = LatentStore.open(url, read_only=True)
            t0 = time.perf_counter()
            for u in range(store.num_units):
                store.read_range(*store.unit_bounds(u))
            r = time.perf_counter() - t0
            size = dir_bytes(url)
            rows.append({"codec": codec, "inner_chunks": inner, "ratio": raw / size, "write_MBps": raw / 1e6 / w,
                         "read_MBps": raw / 1e6 / r, "objects": sum(len(f) for _, _, f in os.walk(url))})
            print(f"  {codec:22s} inner={inner}  size ratio {rows[-1]['ratio']:.3f}  write {rows[-1]['write_MBps']:7.0f} MB/s"
                  f"  read {rows[-1]['read_MBps']:7.0f} MB/s  objects {rows[-1]['objects']}", flush=True)
            shutil.rmtree(url)
    return rows


class ArraySource:
    """The reader's source interface served from one in-memory numpy array (the baseline)."""

    def __init__(self, url: str) -> None:
        self.store = LatentStore.open(url, read_only=True)
        self.array = self.store.read_range(0, self.store.num_samples)

    def valid(self):
        return self.store.valid()

    def labels(self):
        return self.store.labels()

    def read_unit(self, unit: int, flip: bool):
        a, b = self.store.unit_bounds(unit)
        return self.array[a:b], None


def epoch_rate(ds: LatentStreamDataset, epochs: int) -> float:
    n = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        ds.set_epoch(e)
        for batch in ds:
            n += len(batch["labels"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=102_400)
    ap.add_argument("--sweep-samples", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024, help="samples per unit (1024 x 16 KB = 16 MB)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--root", default=None, help="scratch directory (default: a temp dir, removed at the end)")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="dcae15-bench-")
    try:
        print(f"codec sweep: {args.sweep_samples} samples of {SHAPE} fp16, units of {args.chunk} samples")
        codec_sweep(root, args.sweep_samples, args.chunk)

        url = os.path.join(root, "store")
        print(f"writing the loader store: {args.samples} samples ({args.samples * 16384 / 2**30:.2f} GiB)", flush=True)
        write_store(url, args.samples, args.chunk, "none", 1)
        kw = dict(batch_size=args.batch_size, infinite=False, flip=False, normalize="scaling_factor", seed=0)
        baseline = LatentStreamDataset(url, **kw)
        baseline._source = ArraySource(url)
        reader = LatentStreamDataset(url, **kw)
        epoch_rate(reader, 1)  # warm-up: imports, page cache (the store was just written)
        mem = epoch_rate(baseline, args.epochs)
        disk = epoch_rate(reader, args.epochs)
        print(f"in-memory numpy source: {mem:10.0f} samples/s")
        print(f"local Zarr store:       {disk:10.0f} samples/s")
        print(f"ratio store / memory:   {disk / mem:10.2f}  (goal >= 0.8)")
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
