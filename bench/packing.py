"""Benchmark: packing images into webdataset shards -- 2 processes vs 1, and vs a bare decode loop (same files, same run).

    .venv/bin/python bench/packing.py [--images 800] [--width 500] [--height 375] [--shard-mb 8]

Generates ImageNet-like JPEGs (500x375, textured, quality 90: ~100 KB each like ImageNet's ~110 KB) in a class-folder
tree, then times, on the same files:
  1. a bare loop: read each file and fully decode it (``storage.images.decode_image``) -- the floor of packing's work;
  2. ``pack_image_folder(workers=1)`` (inline: read, decode check, hash, tar, index parts, index);
  3. ``pack_image_folder`` on a 2-process Dask LocalCluster (what ``workers=2`` starts; started once up front and
     passed as ``scheduler`` so that its start-up is timed separately).
It prints the per-image costs, the ratios, and the extrapolated ImageNet (1 281 167 images) wall time on a 32-core
node (the arithmetic is printed).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGENET = 1_281_167


def make_tree(root: Path, n: int, w: int, h: int, classes: int = 8) -> int:
    """Textured JPEGs (smooth noise + gradients + fine noise) so that their size and decode cost look like photos."""
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        d = root / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.standard_normal((h // 16 + 1, w // 16 + 1, 3))
        low = np.kron(low, np.ones((16, 16, 1)))[:h, :w]
        img = 128 + 40 * low + 30 * np.sin(xx / (7 + i % 5))[..., None] + 18 * rng.standard_normal((h, w, 3))
        p = d / f"img_{i:06d}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        total += p.stat().st_size
    return total


def bare_decode(root: Path) -> tuple[float, float]:
    """(wall s, CPU s) of reading + fully decoding every file in one thread."""
    from storage.images import decode_image

    files = sorted(root.rglob("*.JPEG"))
    t0, c0 = time.perf_counter(), time.process_time()
    for f in files:
        decode_image(f.read_bytes())
    return time.perf_counter() - t0, time.process_time() - c0


def pack(src: Path, dst: Path, shard_bytes: int, client=None) -> tuple[float, float, str]:
    """(wall s, CPU s of this process + the Dask workers, fingerprint) of one pack."""
    from storage.packing import pack_image_folder

    cpu = (lambda: sum(client.run(time.process_time).values())) if client is not None else (lambda: 0.0)  # noqa: E731
    w0, t0, c0 = cpu(), time.perf_counter(), time.process_time()
    info = pack_image_folder(str(src), str(dst), shard_bytes=shard_bytes, progress=False,
                             scheduler=client.scheduler.address if client is not None else None)
    wall, own = time.perf_counter() - t0, time.process_time() - c0
    return wall, own + cpu() - w0, info.fingerprint


def _burn(n: int = 2_000_000) -> int:
    x = 0
    for i in range(n):
        x += i * i
    return x


def machine_parallelism(client) -> float:
    """Control: throughput of 2 worker processes each running a fixed CPU loop vs 1 (2.0 on 2 free cores)."""
    t0 = time.perf_counter()
    client.submit(_burn, pure=False).result()
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    client.gather([client.submit(_burn, pure=False) for _ in range(2)])
    return 2 * one / (time.perf_counter() - t0)


def plan_at_scale(rows: int, shard_bytes: int = 1 << 30) -> tuple[float, float, int]:
    """Driver planning for ``rows`` listed images (ImageNet-like names and sizes, no I/O): seeded order, unique keys,
    shard cut, task rows. Returns (seconds, MB of resident memory the plan added, shards)."""
    import psutil

    from storage.packing import _unique_keys, plan_shards

    rng = np.random.default_rng(0)
    sizes = rng.integers(20_000, 200_000, rows)
    items = [(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", f"n{i % 1000:08d}/n{i % 1000:08d}_{i}", i % 1000, "jpeg",
              int(sizes[i]), f"/data/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", None) for i in range(rows)]
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    order = np.random.default_rng(0).permutation(rows)
    keys = _unique_keys(items[i][1] for i in order)
    bounds = plan_shards(np.fromiter((items[i][4] for i in order), np.int64, rows), shard_bytes)
    tasks = [[(keys[j], items[order[j]][2], items[order[j]][3], items[order[j]][0], items[order[j]][5],
               items[order[j]][6], items[order[j]][4]) for j in range(a, b)] for a, b in bounds]
    dt = time.perf_counter() - t0
    peak = (psutil.Process().memory_info().rss - rss0) / 2**20
    del tasks
    return dt, peak, len(bounds)


def assemble_at_scale(rows: int) -> tuple[float, float, float]:
    """The final step at ImageNet size: index table -> Parquet, then the content fingerprint over (key, label, hash,
    valid). Returns (seconds, MB of Parquet, MB of RSS added)."""
    import psutil
    import pyarrow.parquet as pq

    from storage.fingerprint import fingerprint
    from storage.packing import LABEL_CONVENTION, _index_table

    rss0 = psutil.Process().memory_info().rss
    cols = {"key": [f"n{i % 1000:08d}_n{i % 1000:08d}_{i}" for i in range(rows)], "label": [i % 1000 for i in range(rows)],
            "shard": [i // 9560 for i in range(rows)], "offset": list(range(rows)), "bytes": [110_000] * rows,
            "hash": [f"{i:016x}" for i in range(rows)], "valid": [True] * rows, "reason": [""] * rows,
            "source": [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(rows)]}
    t0 = time.perf_counter()
    table = _index_table(cols)
    del cols
    buf = io.BytesIO()
    pq.write_table(table, buf)
    got = {c: table.column(c).to_pylist() for c in ("key", "label", "hash", "valid")}
    fingerprint([got["key"], got["label"], got["hash"], got["valid"], LABEL_CONVENTION])
    return time.perf_counter() - t0, len(buf.getvalue()) / 2**20, (psutil.Process().memory_info().rss - rss0) / 2**20


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--shard-mb", type=float, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plan-rows", type=int, default=IMAGENET, help="rows of the driver-planning simulation (0: skip)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    tmp = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    total = make_tree(tmp / "src", args.images, args.width, args.height)
    n, shard = args.images, int(args.shard_mb * 2**20)
    print(f"{n} JPEGs {args.width}x{args.height}, {total / n / 1024:.0f} KB each, shards of {args.shard_mb} MB; "
          f"load {os.getloadavg()[0]:.2f} at start")
    bare_decode(tmp / "src")  # warm the page cache: every variant then reads from memory
    import pyarrow.parquet  # noqa: F401  (imports are not packing time)

    from storage.cluster import dask_client

    t0 = time.perf_counter()
    runs: dict[str, list] = {"bare": [], "pack1": [], "pack2": [], "control": []}
    with dask_client(None, 2) as client:  # what pack_image_folder(workers=2) starts; here started once, up front
        client.run(lambda: __import__("storage.packing") and __import__("pyarrow.parquet"))
        t_start = time.perf_counter() - t0
        # interleaved repetitions: on a shared machine the load drifts; medians of neighbours are comparable
        for rep in range(args.reps):
            runs["bare"].append(bare_decode(tmp / "src"))
            runs["pack1"].append(pack(tmp / "src", tmp / f"w1-{rep}", shard))
            runs["pack2"].append(pack(tmp / "src", tmp / f"w2-{rep}", shard, client))
            runs["control"].append((machine_parallelism(client), 0.0, ""))
    fps = {r[2] for k in ("pack1", "pack2") for r in runs[k]}  # noqa: C401
    assert len(fps) == 1, "the fingerprint must not depend on the worker count"
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
    (t_bare, c_bare), (t1, c1), (t2, c2) = med["bare"], med["pack1"], med["pack2"]
    control = med["control"][0]
    print(f"medians of {args.reps} interleaved runs (wall s / CPU s summed over processes):")
    print(f"  bare read+decode loop : {t_bare:6.2f} s wall {c_bare:6.2f} s CPU  {1e3 * c_bare / n:5.2f} ms CPU/img (baseline)")
    print(f"  pack, 1 process       : {t1:6.2f} s wall {c1:6.2f} s CPU  {1e3 * c1 / n:5.2f} ms CPU/img   "
          f"pack1/bare: wall {t1 / t_bare:.2f}x, CPU {c1 / c_bare:.2f}x")
    print(f"  pack, 2 processes     : {t2:6.2f} s wall {c2:6.2f} s CPU  {1e3 * c2 / n:5.2f} ms CPU/img   "
          f"speed-up vs 1 process: wall {t1 / t2:.2f}x; CPU per image 2 vs 1 = {c2 / c1:.2f}x "
          f"(plus {t_start:.1f} s of LocalCluster start-up, once per run)")
    print(f"  control: 2 Dask workers running a fixed CPU loop deliver {control:.2f}x the throughput of 1 (2.00 on two "
          f"free cores) -> packing's parallel efficiency relative to what this machine gives: "
          f"{(t1 / t2) / control:.2f}")
    print(f"  load {os.getloadavg()[0]:.2f} at end; fingerprints equal: {fps.pop()}")
    t_plan, mem_plan, n_shards = plan_at_scale(args.plan_rows) if args.plan_rows else (0.0, 0.0, 0)
    if args.plan_rows:
        print(f"  driver planning for {args.plan_rows} listed images (order, keys, 1 GB shard cut, task rows): "
              f"{t_plan:.1f} s, {mem_plan:.0f} MB of RSS added, {n_shards} shards")
    t_asm = 0.0
    if args.plan_rows:
        t_asm, mb_asm, rss_asm = assemble_at_scale(args.plan_rows)
        print(f"  index assembly for {args.plan_rows} rows (Parquet + content fingerprint): {t_asm:.1f} s, "
              f"{mb_asm:.0f} MB index.parquet, {rss_asm:.0f} MB of RSS added")
    per_img = c2 / n  # CPU per image when packing in parallel (the shards are independent: no shared work)
    cores = 32
    cpu_s = IMAGENET * per_img / cores
    print("ImageNet extrapolation (32-core node, one packing process per core):")
    print(f"  CPU: {IMAGENET} img x {1e3 * per_img:.2f} ms CPU/img (2-process run) / 32 processes = {cpu_s:.0f} s = "
          f"{cpu_s / 60:.1f} min (+ listing: 1 282 S3 LIST pages of 1000 keys, 16 class prefixes at a time; + {t_plan:.0f} s of driver planning and {t_asm:.0f} s of index assembly measured above)")
    print(f"  I/O: 140 GB read + 140 GB written; NVMe at ~3 GB/s -> ~{2 * 140 / 3:.0f} s; S3 at 25 Gbit/s "
          f"(~3 GB/s) -> ~{2 * 140 / 3:.0f} s, with 32 x 16 = 512 concurrent GETs of ~110 KB at an assumed ~30 ms "
          f"each = {512 / 0.03:.0f} img/s >> the CPU rate of {cores / per_img:.0f} img/s, so packing stays CPU-bound")
