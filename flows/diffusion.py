"""Stage 4: train one diffusion backbone on a latent store — in this process for one CPU/GPU, else via torchrun."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_pointer, requests_shown
from flows.caching import BackboneSource, run_cached, stage_cache
from flows.common import ConfigArg, stage_config
from flows.events import watch_training
from flows.launch import in_process, run_torchrun, write_launch_file
from flows.machine import GPU_TAG, Slot, gpu_slot, slot_launch
from flows.pointers import describe_run, describe_store, run_url_for

__all__ = ["fit_backbone", "train_diffusion"]


@task(cache_policy=stage_cache("launch") + BackboneSource(), persist_result=True, result_serializer="json",
      tags=[GPU_TAG])
def fit_backbone(root: str, store: dict[str, Any], backbone: str, train: dict[str, Any], seed: int,
                 launch: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) the run for (backbone, training config, store); returns a pointer to its final checkpoint.

    ``launch`` (processes, nodes, torchrun arguments) is not part of the cache key; the run id does not depend on
    it either, so a run started on one GPU can be resumed on eight. One writer per run: the trainer (its rank 0)
    holds the run's lease (storage/lease.py); a second training of the run waits, then resumes the last checkpoint.
    """
    from dcae15.diffusion.train import DiffusionTrainConfig, check_plugin, store_info, train_diffusion as train_fn

    log = get_run_logger()
    cfg = DiffusionTrainConfig.from_dict({"model": backbone, "seed": seed, **train})
    run_url = run_url_for(root, store["store_id"], backbone, train, seed)
    log.info("training %s on %s -> %s", backbone, store["url"], run_url)
    with (requests_shown("diffusion run", run_url.rstrip("/").rsplit("/", 1)[-1]),
          gpu_slot(),  # one GPU job per machine unless asked (flows/machine.py)
          watch_training(run_url, root=root, backbone=backbone, steps=cfg.steps)):  # checkpoint events + progress
        if in_process(launch):
            train_fn(cfg, store["url"], run_url)
        else:  # one run file: torchrun's own parser would take the trainer's --store / --run as its own options
            if ":" in backbone:  # an import-path backbone: a bad plug-in fails here, in one line, not in N children
                check_plugin(cfg, store_info(store["url"]))
            run_file = write_launch_file(run_url, {"store_url": store["url"], "run_url": run_url,
                                                   "train": cfg.to_dict()})
            run_torchrun(launch, "dcae15.diffusion.train", ["--config", run_file], log=log.info)
    return describe_run(run_url)


@flow(name="train_diffusion", flow_run_name=names.train_name)
def train_diffusion(store: str, backbone: str, root: str | None = None, config: ConfigArg = "demo",
                    nproc_per_node: int | None = None, nnodes: int | None = None,
                    torchrun_args: list[str] | None = None, slot: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train backbone preset ``backbone`` on the latent store at ``store`` into ``<root>/runs/diffusion/<run_id>``.

    ``nproc_per_node`` / ``nnodes`` > 1 launch ``torchrun``; ``torchrun_args`` are passed through (rendezvous etc.).
    ``slot`` (``flows.machine.Slot`` fields: index, cpus, gpus): train under torchrun on that share of the machine
    only (the pipeline's concurrent backbones, ``diffusion.concurrency``).
    A failed child is a failed flow run whose message holds the child's last lines; rerunning resumes the run.
    """
    over = {k: v for k, v in {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "torchrun_args": torchrun_args}.items()
            if v is not None}
    cfg = stage_config(root, config, **({"diffusion": over} if over else {}))
    d = cfg.diffusion
    launch = d.launch() if slot is None else slot_launch(d.launch(), Slot.from_dict(slot))
    pointer = describe_store(store)
    if not pointer["complete"]:
        raise ValueError(f"latent store {store} is not complete: run encode_latents first")
    task_ = fit_backbone.with_options(retries=d.retries, retry_delay_seconds=5)
    train = {**d.train.to_dict(), "model": backbone}  # the one training config, per backbone
    return publish_pointer("train", run_cached(task_, root=cfg.root, store=pointer, backbone=backbone,
                                               train=train, seed=train["seed"], launch=launch))
