"""Stage 3: encode the dataset into a Zarr latent store, one Dask task per group of store units.

Why plain dask.distributed inside one Prefect task and not prefect-dask's task runner: every Dask worker process
would then be a Prefect client, and without a running server each starts its own temporary Prefect server (measured
here: 3 servers, 48 s for 4 trivial tasks; DESIGN §8). The Dask tasks are pure functions (``encode_units``) that
write their own units and markers, so Prefect needs to see only the whole encode as one cached, resumable task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import Progress, artifact_key, publish_pointer
from flows.autoencoder import describe_ae
from flows.caching import run_cached, stage_cache
from flows.common import ConfigArg, stage_config
from flows.prepare import describe_dataset

__all__ = ["describe_store", "validate_store", "dask_client", "encode_store", "encode_latents"]


def describe_store(url: str) -> dict[str, Any]:
    """The pointer of a latent store: URL + the fingerprints it was written from + its size and scaling."""
    from storage.latent_store import LatentStore, store_id

    store = LatentStore.open(url, read_only=True)
    a = store.attrs
    sid = store_id(a["dataset_fingerprint"], a["ae_fingerprint"], int(a["resolution"]), a.get("crop", "adm-center"),
                   bool(a.get("flip", False)))
    return {"kind": "latent_store", "url": url, "store_id": sid,
            "ae_fingerprint": a["ae_fingerprint"], "dataset_fingerprint": a["dataset_fingerprint"],
            "resolution": int(a["resolution"]), "num_samples": store.num_samples, "complete": store.is_complete and not store.missing_units()}


def validate_store(pointer: dict[str, Any]) -> str | None:
    """None if the store exists, every unit has its marker and it was finalized; else what is wrong."""
    try:
        now = describe_store(pointer["url"])
    except Exception as exc:  # noqa: BLE001 - missing / unreadable store means "recompute"
        return f"cannot open {pointer['url']}: {exc}"
    if not now["complete"]:
        return "store is incomplete (units missing or not finalized)"
    return None if now == pointer else f"store changed: {now} != {pointer}"


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int, processes: bool) -> Iterator[Any]:
    """A Dask client on ``scheduler`` (a real cluster), or on a LocalCluster started (and stopped) here."""
    import logging

    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would drown the flow's own log
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    # one thread per worker: torch in each worker process then uses one core, and workers scale across cores
    # worker processes talk over TCP on loopback only; threads use Dask's in-process transport
    net = {"host": "127.0.0.1"} if processes else {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None,
                      **net) as cluster, \
            Client(cluster) as client:
        yield client


_WHERE = ("scheduler", "workers", "processes", "units_per_task", "device")


@task(cache_policy=stage_cache("where"), persist_result=True, result_serializer="json")
def encode_store(root: str, ae: dict[str, Any], dataset: dict[str, Any], enc: dict[str, Any],
                 where: dict[str, Any]) -> dict[str, Any]:
    """Create (or reopen) the store for (dataset, AE, resolution, flip), encode its missing units, finalize.

    ``where`` (Dask scheduler, workers, units per task, device) is not part of the cache key: it says where the
    work runs, not what it computes.
    """
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    from dcae15.encode import encode_units, prepare_store
    from storage.latent_store import LatentStore

    log = get_run_logger()
    store_url = prepare_store(ae["url"], dataset["url"], root, resolution=enc["resolution"], flip=enc["flip"],
                              chunk_size=enc["chunk_size"])
    store = LatentStore.open(store_url, expect_ae=ae["fingerprint"], expect_dataset=dataset["fingerprint"],
                             expect_resolution=enc["resolution"])
    missing = store.missing_units()
    log.info("latent store %s: %d of %d units to encode", store_url, len(missing), store.num_units)
    k = where["units_per_task"]
    groups = [missing[i:i + k] for i in range(0, len(missing), k)]
    progress = Progress(artifact_key("progress-encode", store_url.rstrip("/").rsplit("/", 1)[-1]), f"encoding {store_url}",
                        done=store.num_units - len(missing), total=store.num_units)
    if groups:
        with dask_client(where["scheduler"], where["workers"], where["processes"]) as client:
            futures = [client.submit(encode_units, ae["url"], dataset["url"], store_url, g, batch_size=enc["batch_size"],
                                     device=where["device"], pure=False) for g in groups]
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
    section = dataclasses.asdict(cfg.encode)
    where = {k: section.pop(k) for k in _WHERE}
    return publish_pointer("encode", run_cached(encode_store, validate_store, root=cfg.root, ae=describe_ae(ae), dataset=describe_dataset(dataset),
                      enc=section, where=where))
