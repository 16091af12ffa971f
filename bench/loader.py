"""Streaming-reader benchmark: the reader against the limit — a bare gather of the same rows (and flip variants)
from one in-memory fp16 array plus the cast to fp32 — and against the same reader fed from memory, in one run.

Sections (all by default; pick with --only):
  limit   local store, 128x8x8 and 128x4x4, flips on/off, 0 (in-process), 1 and 2 DataLoader workers
  s3      the same store on a loopback moto S3 server next to the local one, GETs per rank per epoch
  imagenet  1 281 167 rows (tiny latents, ImageNet-sized units): requests, setup / planning time, memory
  profile cProfile of one in-process epoch (where the remaining time goes)
  codecs  codec / sharding write+read MB/s sweep

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader.py                 # everything, ~5 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/loader.py --only limit --rows 4096
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from torch.utils.data import DataLoader

from storage.latent_store import LatentStore
from storage.reader import LatentStreamDataset
from storage.units import CODECS

ATTRS = {"ae_fingerprint": "bench", "dataset_fingerprint": "bench", "resolution": 256}
IMAGENET_ROWS = 1_281_167


def latent_like(n: int, seed: int, shape: tuple[int, int, int] = (128, 8, 8)) -> np.ndarray:
    """Unit-scale fp16 values with per-channel offsets/scales and spatial correlation, like AE latents."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    base = rng.standard_normal((n, c, max(1, h // 2), max(1, w // 2))).astype(np.float32)
    x = base.repeat(h // base.shape[2], axis=2).repeat(w // base.shape[3], axis=3)
    x = x + 0.3 * rng.standard_normal((n, c, h, w)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, (1, c, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.5, 0.5, (1, c, 1, 1)).astype(np.float32)
    return (x * scale + shift).astype(np.float16)


def write_store(url: str, n: int, shape=(128, 8, 8), chunk: int | None = None, codec: str = "none", inner: int = 1,
                flip: bool = True, seed: int = 0, storage_options: dict | None = None) -> float:
    store = LatentStore.create(url, num_samples=n, channels=shape[0], height=shape[1], width=shape[2], flip=flip,
                               attrs=ATTRS, chunk_size=chunk, codec=codec, inner_chunks=inner,
                               storage_options=storage_options)
    t0 = time.perf_counter()
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        x = latent_like(b - a, seed + u, shape)
        store.write_unit(u, x, np.arange(a, b) % 1000, np.ones(b - a, bool), x[..., ::-1] if flip else None)
    elapsed = time.perf_counter() - t0
    store.finalize()
    return elapsed


def load_note() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -------------------------------------------------------------------------------------------- baselines
class ArraySource:
    """The reader's source interface served from in-memory numpy arrays (the reader's own overhead only)."""

    def __init__(self, url: str) -> None:
        self.store = LatentStore.open(url, read_only=True)
        n = self.store.num_samples
        self.arrays = {False: self.store.read_range(0, n)}
        if self.store.has_flip:
            self.arrays[True] = self.store.read_range(0, n, flip=True)

    def row_index(self):
        return self.store.read_row_index()

    def read(self, unit: int, flip: bool, rows: np.ndarray):
        a, _ = self.store.unit_bounds(unit)
        return int(rows[0]), self.arrays[flip][a + rows[0]:a + rows[-1] + 1]


def bare_gather(url: str, batches: list, scale: float, reps: int) -> dict:
    """Samples/s of gathering the same rows and variants from one in-memory fp16 array and casting them to fp32
    (times the scaling factor, as the reader does): torch index_select + float + mul_, and numpy take + astype."""
    store = LatentStore.open(url, read_only=True)
    n = store.num_samples
    parts = [store.read_range(0, n)] + ([store.read_range(0, n, flip=True)] if store.has_flip else [])
    both = np.concatenate(parts)
    both_t = torch.from_numpy(both)
    idx = [r + f.astype(np.int64) * n for r, f in batches]
    idx_t = [torch.from_numpy(i) for i in idx]
    total = sum(len(i) for i in idx)
    best_t = best_np = best_cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in idx_t:
            torch.index_select(both_t, 0, i).float().mul_(scale)
        best_t = min(best_t, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        t0 = time.perf_counter()
        for i in idx:
            np.multiply(both[i], np.float32(scale), dtype=np.float32)
        best_np = min(best_np, time.perf_counter() - t0)
    return {"torch": total / best_t, "numpy": total / best_np, "torch_cpu": total / best_cpu}


class PremadeBatches(torch.utils.data.IterableDataset):
    """Yields the same-shaped batch forever, allocated the way the reader allocates it (shared memory in a worker):
    the DataLoader's own cost of moving a batch from a worker to the main process, the ceiling for workers > 0."""

    def __init__(self, shape: tuple, batch_size: int, dtype: torch.dtype) -> None:
        self.shape, self.batch_size, self.dtype = shape, batch_size, dtype

    def __iter__(self):
        from storage.reader import _empty

        shared = torch.utils.data.get_worker_info() is not None
        src = torch.zeros((self.batch_size, *self.shape), dtype=torch.float16)
        while True:
            x = _empty(tuple(src.shape), self.dtype, shared).copy_(src)
            yield {"latents": x, **{k: _empty((self.batch_size,), t, shared)
                                    for k, t in (("labels", torch.int64), ("indices", torch.int64),
                                                 ("flipped", torch.bool))}}


def transport_rate(shape: tuple, batch_size: int, workers: int, batches: int, dtype=torch.float32) -> float:
    it = iter(DataLoader(PremadeBatches(shape, batch_size, dtype), batch_size=None, num_workers=workers))
    for _ in range(10):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def reader_rate(url: str, kw: dict, workers: int, batches: int, reps: int, source=None, warmup: int = 10) -> dict:
    """Steady-state samples/s of the reader (infinite mode, after ``warmup`` batches, so DataLoader worker start-up
    is excluded and epoch boundaries are included); best of ``reps``. Also returns the (rows, flipped) of the timed
    batches — what the bare gather must gather — and, in-process, samples per CPU-second of the whole process."""
    best = None
    for _ in range(reps):
        ds = LatentStreamDataset(url, infinite=True, **kw)
        if source is not None:
            ds._source = source
        it = iter(DataLoader(ds, batch_size=None, num_workers=workers))
        for _ in range(warmup):
            next(it)
        seen, n = [], 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = next(it)
            n += len(batch["indices"])
            seen.append((batch["indices"].numpy(), batch["flipped"].numpy()))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        del it
        run = {"rate": n / wall, "cpu_rate": n / cpu if workers == 0 else float("nan"), "batches": seen,
               "requests": dict(ds.source().requests) if source is None and workers == 0 else None}
        if best is None or run["rate"] > best["rate"]:
            best = run
    return best


# -------------------------------------------------------------------------------------------- sections
def section_limit(root: str, args) -> list[dict]:
    rows_out = []
    for shape, n in (((128, 8, 8), args.rows), ((128, 4, 4), args.rows * 4)):
        url = os.path.join(root, f"store-{shape[1]}x{shape[2]}")
        w = write_store(url, n, shape)
        store = LatentStore.open(url, read_only=True)
        print(f"\n## {shape[0]}x{shape[1]}x{shape[2]} fp16, {n} rows, units of {store.unit_size} "
              f"({store.unit_size * 2 * int(np.prod(shape)) / 2**20:.0f} MiB), flips stored; written in {w:.1f}s; "
              f"{load_note()}", flush=True)
        print("| flips | DataLoader workers | bare gather torch | bare gather numpy | reader, in-memory source "
              "| reader, local store | store / limit | store / in-memory | per CPU-second: store / limit | DataLoader transport "
              "ceiling | store / transport |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        timed = max(8, 2 * n // args.batch_size)  # two epochs of batches
        cases = [(flip, workers, "float32") for flip in (True, False) for workers in (0, 1, 2)]
        cases += [(True, 0, "float16"), (True, 2, "float16")]
        mem_source = ArraySource(url)
        for flip, workers, dtype in cases:
            kw = dict(batch_size=args.batch_size, flip=flip, normalize="scaling_factor", seed=0, dtype=dtype)
            scale = LatentStreamDataset(url, **kw)._setup()["scale_value"]
            r = reader_rate(url, kw, workers, timed, args.reps)
            limit = bare_gather(url, r["batches"], scale, args.reps)
            lim = max(limit["torch"], limit["numpy"])
            r_mem = reader_rate(url, kw, 0, timed, args.reps, source=mem_source) if workers == 0 else None
            tdtype = torch.float16 if dtype == "float16" else torch.float32
            ceiling = transport_rate(shape, args.batch_size, workers, timed, tdtype) if workers else None
            row = {"shape": shape, "flip": flip, "workers": workers, "limit": limit, "mem": r_mem, "store": r}
            rows_out.append(row)
            mem_s = f"{r_mem['rate']:,.0f}" if r_mem else "–"
            mem_ratio = f"{r['rate'] / r_mem['rate']:.2f}" if r_mem else "–"
            cpu_ratio = f"{r['cpu_rate'] / limit['torch_cpu']:.2f}" if workers == 0 else "–"
            ceil_s = f"{ceiling:,.0f} | {r['rate'] / ceiling:.2f}" if ceiling else "– | –"
            print(f"| {'on' if flip else 'off'} | {workers or '0 (in-process)'}"
                  f"{' fp16 out' if dtype == 'float16' else ''} | {limit['torch']:,.0f} | "
                  f"{limit['numpy']:,.0f} | {mem_s} | {r['rate']:,.0f} | **{r['rate'] / lim:.2f}** | "
                  f"{mem_ratio} | {cpu_ratio} | {ceil_s} |", flush=True)
        shutil.rmtree(url, ignore_errors=True)
    return rows_out


def epoch_rate(ds: LatentStreamDataset) -> float:
    """Samples/s of one finite epoch in this process (a fresh iteration: includes filling the first window)."""
    n = 0
    t0 = time.perf_counter()
    for batch in ds:
        n += len(batch["indices"])
    return n / (time.perf_counter() - t0)


def _count_s3_requests(fs) -> dict:
    """Count HTTP requests an s3fs filesystem sends (botocore's before-send event), by operation."""
    counts: dict[str, int] = {}

    def hook(request, **_):
        op = request.method
        counts[op] = counts.get(op, 0) + 1

    fs.connect(refresh=False) if hasattr(fs, "connect") else None
    fs.s3.meta.events.register("before-send.s3", hook)
    return counts


def section_s3(root: str, args) -> None:
    import boto3

    from storage.urls import url_to_fs

    # The server runs in its own process: in this one it would compete with the reader for the GIL.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bench")
    shape, n, chunk = (128, 4, 4), args.s3_rows, args.s3_chunk
    local = os.path.join(root, "s3-local")
    remote = "s3://bench/store"
    write_store(local, n, shape, chunk=chunk)
    t0 = time.perf_counter()
    write_store(remote, n, shape, chunk=chunk, storage_options=opts)
    print(f"\n## object storage: moto S3 server on loopback vs local disk ({n} rows of {shape}, units of {chunk} "
          f"rows = {chunk * 2 * int(np.prod(shape)) / 2**20:.1f} MiB, flips stored; S3 write {time.perf_counter() - t0:.0f}s; "
          f"{load_note()})", flush=True)
    print("| store | flips | reads_in_flight | samples/s (one epoch) | vs local | HTTP GETs per rank per epoch "
          "| requests at setup (dataset built) | unit reads | MiB read |")
    print("|---|---|---|---|---|---|---|---|---|")
    for flip in (True, False):
        kw = dict(batch_size=args.batch_size, infinite=False, flip=flip, seed=0)
        local_ds = LatentStreamDataset(local, **kw)
        epoch_rate(local_ds)  # warm-up
        base = max(epoch_rate(local_ds) for _ in range(args.reps))
        print(f"| local | {'on' if flip else 'off'} | 4 | {base:,.0f} | 1.00 | – | – | – | – |", flush=True)
        for inflight in (1, 4, 8):
            fs = url_to_fs(remote, opts)[0]
            counts = _count_s3_requests(fs)
            ds = LatentStreamDataset(remote, storage_options=opts, reads_in_flight=inflight,
                                     prefetch_units=max(4, inflight), **kw)
            setup = sum(counts.values())
            src = ds.source()
            before = dict(src.requests)
            counts.clear()
            rate = epoch_rate(ds)
            print(f"| s3 (moto) | {'on' if flip else 'off'} | {inflight} | {rate:,.0f} | {rate / base:.2f} | "
                  f"{counts.get('GET', 0)} (+{sum(counts.values()) - counts.get('GET', 0)} other) | {setup} | "
                  f"{src.requests['unit_reads'] - before['unit_reads']} | "
                  f"{(src.requests['bytes'] - before['bytes']) / 2**20:.0f} |", flush=True)
            fs.s3.meta.events.unregister("before-send.s3")
    server.terminate()
    server.wait(timeout=10)


def section_imagenet(root: str, args) -> None:
    """1 281 167 rows of 1x1x1 latents in units of 1024 rows (the unit count of 128x8x8 latents in 16 MiB units)."""
    url = os.path.join(root, "imagenet-sim")
    t0 = time.perf_counter()
    write_store(url, IMAGENET_ROWS, (1, 1, 1), chunk=1024)
    store = LatentStore.open(url, read_only=True)
    print(f"\n## ImageNet-size simulation: {IMAGENET_ROWS:,} rows, {store.num_units} units of 1024 rows "
          f"(1x1x1 latents; written in {time.perf_counter() - t0:.0f}s; {load_note()})", flush=True)
    print("| world size x workers | setup s (open + rows.npz, per rank) | object reads at setup | planning s per epoch "
          "per stream | rows per stream | unit reads per stream per epoch | reader memory after setup MiB (+ one plan) "
          "| epoch s (stream 0) |")
    print("|---|---|---|---|---|---|---|---|")
    from storage.reader import _Schedule

    for ws, workers in ((1, 1), (8, 4), (64, 8)):
        tracemalloc.start()  # numpy and torch CPU buffers report to tracemalloc
        t0 = time.perf_counter()
        ds = LatentStreamDataset(url, batch_size=256, rank=0, world_size=ws, infinite=False, seed=0)
        setup = time.perf_counter() - t0
        src = ds.source()
        setup_reads = dict(src.requests)
        rss_setup = tracemalloc.get_traced_memory()[0] / 2**20
        meta = ds._setup()
        streams = ws * workers
        length = ds._stream_length(meta, streams)
        t0 = time.perf_counter()
        plan = ds._plan(meta, 0, 0, streams, length)
        sched = _Schedule(plan, meta["unit_size"])
        planning = time.perf_counter() - t0
        rss_plan = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        unit_reads = len(sched.spans)
        t0 = time.perf_counter()
        n = 0
        if workers == 1:
            for batch in ds:
                n += len(batch["indices"])
        epoch_s = f"{time.perf_counter() - t0:.1f}" if n else "–"
        print(f"| {ws} x {workers} | {setup:.3f} | {setup_reads['row_index']} rows.npz + store metadata | "
              f"{planning:.3f} | {length:,} | {unit_reads} | {rss_setup:.1f} (+{rss_plan - rss_setup:.1f}) | "
              f"{epoch_s} |", flush=True)
        if n:
            reads = src.requests["unit_reads"] - setup_reads["unit_reads"]
            print(f"|   measured epoch of stream 0: {n:,} rows, {reads} unit reads |||||||")
        del ds, plan, sched
    shutil.rmtree(url, ignore_errors=True)


def section_profile(root: str, args) -> None:
    url = os.path.join(root, "profile")
    write_store(url, args.rows, (128, 8, 8))
    ds = LatentStreamDataset(url, batch_size=args.batch_size, infinite=False, flip=True, seed=0)
    for _ in ds:  # warm-up: page cache, imports
        pass
    prof = cProfile.Profile()
    prof.enable()
    for _ in ds:
        pass
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print(f"\n## profile of one in-process epoch, 128x8x8, flips on ({load_note()})")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])
    shutil.rmtree(url, ignore_errors=True)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def section_codecs(root: str, args) -> None:
    n, chunk = args.sweep_samples, 1024
    raw = n * 2 * 128 * 64
    print(f"\n## codec sweep: {n} samples of 128x8x8 fp16, units of {chunk} samples ({load_note()})")
    for codec in CODECS:
        for inner in (1, 8):
            url = os.path.join(root, f"sweep-{codec}-{inner}")
            w = write_store(url, n, chunk=chunk, codec=codec, inner=inner, flip=False)
            store = LatentStore.open(url, read_only=True)
            t0 = time.perf_counter()
            for u in range(store.num_units):
                store.read_range(*store.unit_bounds(u))
            r = time.perf_counter() - t0
            print(f"  {codec:22s} inner={inner}  size ratio {raw / dir_bytes(url):.3f}  write {raw / 1e6 / w:7.0f} MB/s"
                  f"  read {raw / 1e6 / r:7.0f} MB/s", flush=True)
            shutil.rmtree(url)


SECTIONS = {"limit": section_limit, "s3": section_s3, "imagenet": section_imagenet, "profile": section_profile,
            "codecs": section_codecs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="limit,s3,imagenet,profile", help=f"comma list of {sorted(SECTIONS)}")
    ap.add_argument("--rows", type=int, default=16384, help="rows of the 128x8x8 store (x4 for 128x4x4)")
    ap.add_argument("--s3-rows", type=int, default=16384)
    ap.add_argument("--s3-chunk", type=int, default=1024, help="rows per unit in the S3 comparison")
    ap.add_argument("--sweep-samples", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2, help="timed epochs per measurement (best is reported)")
    ap.add_argument("--root", default=None, help="scratch directory (default: a temp dir, removed at the end)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.root or tempfile.mkdtemp(prefix="dcae15-bench-")
    print(f"# bench/loader.py {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"torch threads 1, {load_note()}; max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    try:
        for name in args.only.split(","):
            SECTIONS[name.strip()](root, args)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
