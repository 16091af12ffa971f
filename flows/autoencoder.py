"""Stage 2: the structured autoencoder — the recipe's phases as cached, resumable stages (in-process or torchrun),
or a pretrained one."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_pointer, requests_shown
from flows.caching import run_cached, stage_cache
from flows.common import ConfigArg, stage_config
from flows.pointers import describe_ae, describe_dataset

__all__ = ["fit_autoencoder", "train_autoencoder"]


@task(cache_policy=stage_cache("launch"), persist_result=True, result_serializer="json")
def fit_autoencoder(root: str, dataset: dict[str, Any], phase: dict[str, Any], chain_fingerprint: str,
                    init: dict[str, Any] | None, launch: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one phase of the recipe; returns a pointer to the phase's saved model.

    ``init`` is the previous phase's pointer (its model fingerprint keys this task's cache, so a retrained phase 2
    retrains phase 3); ``launch`` (processes, nodes) is not part of the cache key, nor of the run directory.
    """
    from dcae15.ae.recipe import phase_run_url
    from dcae15.ae.train import AETrainConfig, train_autoencoder as train
    from flows.launch import in_process, run_torchrun, write_launch_file
    from storage.rundir import RunDir

    cfg = AETrainConfig.from_dict({**phase, "init_from": init["url"] if init else phase.get("init_from")})
    run_url = phase_run_url(root, chain_fingerprint)
    log = get_run_logger()
    log.info("autoencoder phase %s (%s) on %s -> %s", cfg.name, cfg.phase, dataset["url"], run_url)
    with requests_shown("AE run", chain_fingerprint):  # the trainer holds the run's lease (one writer per run)
        if in_process(launch):
            summary = train(cfg, dataset["url"], run_url)
        else:  # one run file: torchrun's own parser would take the trainer's options for its abbreviated ones
            run_file = write_launch_file(run_url, {"dataset_url": dataset["url"], "run_url": run_url,
                                                   "train": cfg.to_dict()})
            run_torchrun(launch, "dcae15.ae.train", ["--config", run_file], log=log.info)
            summary = RunDir(run_url).done()  # written last by rank 0
            if summary is None:
                raise RuntimeError(f"torchrun exited without finishing {run_url} (no done.json); rerun to resume it")
    return {**describe_ae(summary["model_url"]), "phase": cfg.phase, "phase_name": cfg.name,
            "run_url": run_url, "chain_fingerprint": chain_fingerprint}


@flow(name="train_autoencoder", flow_run_name=names.autoencoder_name)
def train_autoencoder(dataset: str, root: str | None = None, config: ConfigArg = "demo",
                      nproc_per_node: int | None = None, nnodes: int | None = None,
                      torchrun_args: list[str] | None = None) -> dict[str, Any]:
    """Run the config's autoencoder recipe (``autoencoder.phases``) on the packed dataset, or load ``pretrained``.

    Each phase is one cached task whose model lands in ``<root>/runs/ae/<chain id>/model``; the returned pointer
    is the last phase's model with ``chain_fingerprint`` (covering every phase and the dataset) and ``phases``.
    ``nproc_per_node`` / ``nnodes`` > 1 train each phase under ``torchrun`` (DDP).
    """
    from dcae15.ae.recipe import chain_fingerprints

    over = {k: v for k, v in {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "torchrun_args": torchrun_args}.items()
            if v is not None}
    cfg = stage_config(root, config, **({"autoencoder": over} if over else {}))
    sec = cfg.autoencoder
    if sec.pretrained:
        return describe_ae(sec.pretrained)
    data = describe_dataset(dataset)
    cfgs = sec.phases  # the recipe's phases, resolved and validated by load_config (flows/config.py)
    fps = chain_fingerprints(cfgs, data["fingerprint"])
    launch = sec.launch()
    done: list[dict[str, Any]] = []
    for c, fp in zip(cfgs, fps):
        done.append(run_cached(fit_autoencoder, root=cfg.root, dataset=data, phase=c.to_dict(),
                               chain_fingerprint=fp, init=done[-1] if done else None, launch=launch))
    return publish_pointer("autoencoder", {**done[-1], "phases": [{k: p[k] for k in ("phase_name", "phase", "url", "fingerprint")}
                                                                for p in done]})
