"""Stage 3: encode the dataset into a Zarr latent store, one Dask task per group of store units.

Why plain dask.distributed inside one Prefect task and not prefect-dask's task runner: every Dask worker process
would then be a Prefect client, and without a running server each starts its own temporary Prefect server (measured
here: 3 servers, 48 s for 4 trivial tasks; DESIGN §8). The Dask tasks are pure functions (``encode_units``) that
write their own units and markers, so Prefect needs to see only the whole encode as one cached, resumable task.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import Progress, artifact_key, publish_pointer, requests_shown
from flows.caching import run_cached, stage_cache
from flows.common import ConfigArg, stage_config
from flows.pointers import describe_ae, describe_dataset, describe_store

__all__ = ["dask_client", "encode_client", "resolve_device", "latent_store_url", "encode_store",
           "encode_latents"]


def dask_client(scheduler: str | None, workers: int, processes: bool):
    """A Dask client on ``scheduler`` or on a LocalCluster of ``workers`` (see :func:`storage.cluster.dask_client`)."""
    from storage.cluster import dask_client as client

    return client(scheduler, workers, processes=processes)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this machine has a GPU, else ``cpu``."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@contextlib.contextmanager
def encode_client(where: dict[str, Any]) -> Iterator[Any]:
    """The Dask client an encode runs on: one pinned worker per GPU, a running cluster, or CPU worker processes.

    - ``device`` cuda, no scheduler: one worker process per visible GPU, each started with its own
      ``CUDA_VISIBLE_DEVICES`` (dask-cuda's ``LocalCUDACluster`` when installed);
    - a scheduler address: its workers as they are; on CUDA, workers that each see several GPUs are pinned to
      one GPU per worker of a host (``dask cuda worker`` pins them already);
    - cpu: a LocalCluster of ``workers`` processes.
    """
    from dcae15.ae.encode import local_device_indices, pin_worker_device, visible_gpus
    from storage.cluster import dask_client as client, device_worker_envs

    cuda = resolve_device(where["device"]).startswith("cuda")
    if where["scheduler"]:
        with client(where["scheduler"]) as c:
            if cuda:
                seen = c.run(lambda: len(visible_gpus()))  # worker address -> GPUs it sees
                if any(n > 1 for n in seen.values()):
                    info = c.scheduler_info()["workers"]
                    hosts = {addr: info[addr]["host"] for addr in seen}
                    per_host = {hosts[a]: n for a, n in seen.items()}
                    for addr, idx in local_device_indices(hosts, per_host).items():
                        if seen[addr] > 1:
                            c.run(pin_worker_device, idx, workers=[addr])
            yield c
        return
    if cuda:
        gpus = visible_gpus()
        if not gpus:
            raise ValueError(f"encode.device={where['device']!r} but no GPU is visible (CUDA_VISIBLE_DEVICES / driver)")
        if where["device"].startswith("cuda:"):  # one named GPU: a single worker pinned to it
            i = int(where["device"].split(":", 1)[1])
            if not 0 <= i < len(gpus):
                raise ValueError(f"encode.device={where['device']!r} but only {len(gpus)} GPUs are visible")
            gpus = [gpus[i]]
        with client(worker_envs=device_worker_envs(gpus)) as c:
            yield c
        return
    with client(None, where["workers"], processes=where["processes"]) as c:
        yield c


_WHERE = ("scheduler", "workers", "processes", "units_per_task", "device", "decode_threads", "prefetch_batches")


@contextlib.contextmanager
def _worker_requests(client: Any, retries: Any) -> Iterator[None]:
    """Add the Dask worker processes' object-storage request counts to this stage's (storage/retries.py)."""
    before = client.run(retries.process_snapshot)
    try:
        yield
    finally:
        try:
            retries.add_workers(before, client.run(retries.process_snapshot))
        except Exception:  # noqa: BLE001 - workers gone with the failure: their counts with them
            pass


def latent_store_url(root: str, ae: dict[str, Any], dataset: dict[str, Any], enc: dict[str, Any]) -> str:
    """Where the store of (dataset, AE, resolution, flip) lives under ``root`` (the id ``prepare_store`` gives it)."""
    from dcae15.ae.encode import CROP
    from storage.latent_store import store_id
    from storage.layout import Root

    return Root(root).latent_store(store_id(str(dataset["fingerprint"]), ae["fingerprint"], enc["resolution"], CROP,
                                            enc["flip"]))


@task(cache_policy=stage_cache("where"), persist_result=True, result_serializer="json")
def encode_store(root: str, ae: dict[str, Any], dataset: dict[str, Any], enc: dict[str, Any],
                 where: dict[str, Any]) -> dict[str, Any]:
    """Create (or reopen) the store for (dataset, AE, resolution, flip), encode its missing units, finalize.

    ``where`` (Dask scheduler, workers, units per task, device) is not part of the cache key: it says where the
    work runs, not what it computes. One writer per store: this driver holds the store's lease (storage/lease.py)
    while its Dask tasks write units; a second encode of the store waits, then finds its units done.
    """
    from storage.lease import claim

    log = get_run_logger()
    url = latent_store_url(root, ae, dataset, enc)
    with requests_shown("latent store", url.rstrip("/").rsplit("/", 1)[-1]), \
            claim(url, what="latent store", log=log.info):
        return _encode(root, ae, dataset, enc, where)


def _encode(root: str, ae: dict[str, Any], dataset: dict[str, Any], enc: dict[str, Any],
            where: dict[str, Any]) -> dict[str, Any]:
    """The body of :func:`encode_store`, under the store's lease."""
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    from dcae15.ae.encode import encode_units, prepare_store
    from storage.latent_store import LatentStore

    log = get_run_logger()
    device = resolve_device(where["device"])
    store_url = prepare_store(ae["url"], dataset["url"], root, resolution=enc["resolution"], flip=enc["flip"],
                              chunk_size=enc["chunk_size"], dtype=enc["dtype"], device=device,
                              ae_fingerprint=ae["fingerprint"])
    store = LatentStore.open(store_url, expect_ae=ae["fingerprint"], expect_dataset=dataset["fingerprint"],
                             expect_resolution=enc["resolution"])
    missing = store.missing_units()
    log.info("latent store %s: %d of %d units to encode", store_url, len(missing), store.num_units)
    k = where["units_per_task"]
    groups = [missing[i:i + k] for i in range(0, len(missing), k)]
    progress = Progress(artifact_key("progress-encode", store_url.rstrip("/").rsplit("/", 1)[-1]), f"encoding {store_url}",
                        done=store.num_units - len(missing), total=store.num_units)
    if groups:
        from storage import retries

        with encode_client(where) as client, _worker_requests(client, retries):
            # the AE was fingerprinted once here (describe_ae); workers load it once each and check that fingerprint
            futures = [client.submit(encode_units, ae["url"], dataset["url"], store_url, g, batch_size=enc["batch_size"],
                                     device="cuda" if device.startswith("cuda") and not where["scheduler"] else device,
                                     ae_fingerprint=ae["fingerprint"],
                                     decode_threads=where["decode_threads"],
                                     prefetch_batches=where["prefetch_batches"], pure=False) for g in groups]
            with tqdm(total=len(missing), desc="encode units", disable=None) as bar:
                for done, fut in enumerate(as_completed(futures), 1):
                    units = fut.result()
                    bar.update(len(units))
                    progress.update(store.num_units - len(missing) + bar.n, store.num_units)
                    log.info("encoded units %s (%d/%d tasks)", units, done, len(futures))
    store = LatentStore.open(store_url)
    store.finalize()
    return describe_store(store_url)


@flow(name="encode_latents", flow_run_name=names.encode_name)
def encode_latents(ae: str, dataset: str, root: str | None = None, config: ConfigArg = "demo",
                   scheduler: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Encode the packed dataset at ``dataset`` with the autoencoder at ``ae`` into ``<root>/latents/<store_id>``.

    ``scheduler`` (a Dask address) and ``workers`` override the config's ``encode`` section.
    """
    over: dict[str, Any] = {}
    if scheduler:
        over["scheduler"] = scheduler
    if workers:
        over["workers"] = workers
    cfg = stage_config(root, config, **({"encode": over} if over else {}))
    section = {**dataclasses.asdict(cfg.encode), "resolution": cfg.resolution}
    where = {k: section.pop(k) for k in _WHERE}
    return publish_pointer("encode", run_cached(encode_store, root=cfg.root, ae=describe_ae(ae), dataset=describe_dataset(dataset),
                      enc=section, where=where))
