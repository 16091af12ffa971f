"""Stage 1: the images — generate the shapes dataset if asked, then pack it into webdataset shards + an index."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_pointer, requests_shown
from flows.caching import run_cached, stage_cache
from flows.common import ConfigArg, stage_config
from flows.pointers import describe_dataset

__all__ = ["pack_images", "prepare_images"]


_WHERE = ("workers", "scheduler", "read_threads")


@task(cache_policy=stage_cache("where"), persist_result=True, result_serializer="json")
def pack_images(root: str, data: dict[str, Any], where: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate (if ``data['source']`` is None) and pack the images; returns a pointer to the packed dataset.

    ``where`` (packing processes, Dask scheduler, read threads) is not part of the cache key: the packed bytes and
    the fingerprint are the same whatever runs them.
    """
    where = where or {"workers": 1, "scheduler": None, "read_threads": 16}
    from storage import shards, synthetic
    from storage.layout import Root
    from storage.lease import claim

    log = get_run_logger()
    src, dst = data["source"], Root(root).dataset(data["name"])
    # one writer per dataset (storage/lease.py): a second packer waits, then finds it packed
    with requests_shown("packed dataset", data["name"]), claim(dst, what="packed dataset", log=log.info):
        if src is None:
            src = Root(root).raw_images(data["name"])
            log.info("generating the shapes dataset into %s (%s)", src, data["synthetic"])
            synthetic.make_shapes_dataset(src, **data["synthetic"])
        log.info("packing %s into shards at %s", src, dst)
        shards.pack_image_folder(src, dst, shard_bytes=data["shard_bytes"], name=data["name"],
                                 workers=where["workers"], scheduler=where["scheduler"],
                                 read_threads=where["read_threads"])
    pointer = describe_dataset(dst)
    log.info("dataset %s: %d images, %d classes, fingerprint %s", dst, pointer["num_samples"],
             pointer["num_classes"], pointer["fingerprint"])
    return pointer


@flow(name="prepare_images", flow_run_name=names.prepare_name)
def prepare_images(root: str | None = None, config: ConfigArg = "demo") -> dict[str, Any]:
    """Pack the images named by the config's ``data`` section into ``<root>/data/<name>/``; returns its pointer."""
    cfg = stage_config(root, config)
    data = dataclasses.asdict(cfg.data)
    where = {k: data.pop(k) for k in _WHERE}
    data.pop("class_names")  # labels figures only: packing (and its cache key) never sees it
    return publish_pointer("prepare", run_cached(pack_images, root=cfg.root, data=data, where=where))
