"""Benchmark: encoding a latent store with Dask — 2 LocalCluster worker processes vs 1 (the same run, same data).

    .venv/bin/python bench/flows_encode_dask.py [--images 4096] [--chunk 256] [--preset tiny-f8c32] [--size 32]

Encodes the same generated dataset twice into fresh stores with `flows.encode.dask_client` + `dcae15.ae.encode.encode_units`
(what the `encode_latents` flow runs, minus Prefect), once per worker count, and prints images/s and the ratio.
The AE is untrained: encoding cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dask.distributed import as_completed


def encode_with(workers: int, ae_url: str, dataset_url: str, root: str, chunk: int, batch: int) -> float:
    from dcae15.ae.encode import encode_units, prepare_store
    from flows.encode import dask_client
    from storage.latent_store import LatentStore

    store_url = prepare_store(ae_url, dataset_url, root, resolution=args.size, flip=True, chunk_size=chunk)
    units = LatentStore.open(store_url).missing_units()
    with dask_client(None, workers, True) as client:
        client.run(lambda: __import__("dcae15.ae.encode"))  # worker start-up and imports are not encode time
        t0 = time.perf_counter()
        futures = [client.submit(encode_units, ae_url, dataset_url, store_url, [u], batch_size=batch, device="cpu",
                                 pure=False) for u in units]
        for f in as_completed(futures):
            f.result()
        return time.perf_counter() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--preset", default="tiny-f8c32")
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()

    from dcae15.ae.model import StructuredAutoencoder
    from storage.shards import pack_image_folder
    from storage.synthetic import make_shapes_dataset

    tmp = tempfile.mkdtemp(prefix="bench-encode-")
    make_shapes_dataset(f"{tmp}/raw", num_classes=8, per_class=args.images // 8, size=args.size)
    pack_image_folder(f"{tmp}/raw", f"{tmp}/data", progress=False)
    ae_url = StructuredAutoencoder.from_preset(args.preset).save_pretrained(f"{tmp}/ae")
    n = (args.images // 8) * 8
    t1 = encode_with(1, ae_url, f"{tmp}/data", f"{tmp}/w1", args.chunk, args.batch)
    t2 = encode_with(2, ae_url, f"{tmp}/data", f"{tmp}/w2", args.chunk, args.batch)
    print(f"{args.preset} @ {args.size}px, {n} images (+flips), units of {args.chunk}:")
    print(f"  1 worker : {t1:6.2f} s  {n / t1:8.1f} img/s   (baseline)")
    print(f"  2 workers: {t2:6.2f} s  {n / t2:8.1f} img/s")
    print(f"  speed-up 2 vs 1 workers: {t1 / t2:.2f}x")
