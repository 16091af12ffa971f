"""The whole recipe: images -> autoencoder -> one latent store -> for each backbone: train, sample, evaluate."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import names
from flows.artifacts import publish_figures
from flows.autoencoder import train_autoencoder
from flows.common import ConfigArg, stage_config
from flows.diffusion import train_diffusion
from flows.encode import encode_latents
from flows.evaluate import (checkpoints_to_score, draw_run_figures, evaluate_autoencoder, evaluate_samples,
                            prepare_extractor,
                            plot_results)
from flows.launch import in_process
from flows.machine import auto_concurrency, gpu_slot, machine_slots
from flows.pointers import dataset_of, describe_store, run_url_for
from flows.prepare import prepare_images
from flows.report import outputs_summary
from flows.sample import sample_run

__all__ = ["run_pipeline", "train_backbones", "train_slot"]


@contextlib.contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - t0, 1)


@task(name="train_slot")
def train_slot(store: str, backbones: list[str], root: str, config: dict[str, Any],
               slot: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Train ``backbones`` one after the other in one job slot of the machine (flows/machine.py; None = as the
    ``diffusion`` section launches them): each one its own ``train_diffusion`` flow run."""
    return [train_diffusion(store=store, backbone=b, root=root, config=config, slot=slot) for b in backbones]


def _committed(run_url: str, which: str) -> list[int]:
    """The run's committed checkpoints to score (``checkpoints_to_score``); none before its first ``latest``."""
    try:
        return checkpoints_to_score(run_url, which)
    except FileNotFoundError:  # no config.yaml / latest pointer yet
        return []


@flow(name="train_backbones", flow_run_name=names.train_backbones_name)
def train_backbones(store: str, dataset: str | None = None, root: str | None = None, config: ConfigArg = "demo",
                    score: bool = True) -> dict[str, Any]:
    """Train every backbone of the config on the latent store at ``store`` and (``score``) sample + score its
    checkpoints per ``evaluate.checkpoints`` against ``dataset`` (the packed images; None = the one the store was
    encoded from). Returns ``{"runs": [run URLs], "samples": {run URL: its last scored sample store},
    "stage_seconds": {stage: s}}``.

    ``diffusion.concurrency`` job slots train at once (backbone i in slot i mod n), each under torchrun on its
    share of the machine. Whenever training runs in other processes, this flow samples and scores each checkpoint
    as soon as it is committed, while training goes on; in-process training (one process, concurrency 1) is
    scored after each backbone, since sampling would share the trainer's process group.
    """
    from dcae15.diffusion.checkpoint import list_checkpoints

    cfg = stage_config(root, config)
    conf = cfg.to_dict()
    d, root = cfg.diffusion, cfg.root
    which = cfg.evaluate.checkpoints
    log = get_run_logger()
    stages: dict[str, float] = {}
    scored: set[tuple[str, int]] = set()
    samples: dict[str, str] = {}
    if score and dataset is None:
        dataset = dataset_of(store, root)

    def score_(run_url: str, steps: list[int]) -> None:
        for step in steps:
            if not score or (run_url, step) in scored:
                continue
            scored.add((run_url, step))
            if step not in list_checkpoints(run_url):  # pruned (keep_checkpoints) before its turn came
                log.warning("run %s no longer has checkpoint %d: not scored", run_url, step)
                continue
            with _timed(stages, "sample + score"):
                pointer = sample_run(run=run_url, root=root, config=conf, checkpoint=step)
                evaluate_samples(samples=pointer["url"], dataset=dataset, root=root, config=conf)
            samples[run_url] = pointer["url"]

    n = d.concurrency or auto_concurrency(len(d.backbones))
    if n == 1 and in_process(d.launch()):
        runs = []
        for backbone in d.backbones:
            with _timed(stages, f"train {backbone}"):
                run = train_diffusion(store=store, backbone=backbone, root=root, config=conf)
            score_(run["url"], checkpoints_to_score(run["url"], which))
            runs.append(run["url"])
        return {"runs": runs, "samples": samples, "stage_seconds": stages}

    pointer = describe_store(store)
    train = d.train.to_dict()
    runs = [run_url_for(root, pointer["store_id"], b, train, train["seed"]) for b in d.backbones]
    slots = [dataclasses.asdict(s) for s in machine_slots(n)] if n > 1 else [None]
    t0 = time.perf_counter()
    with gpu_slot():  # the machine's GPU slot, held once for all the concurrent jobs and the sampling (flows/machine.py)
        futures = [train_slot.submit(store, d.backbones[k::n], root, conf, slots[k]) for k in range(n)
                   if d.backbones[k::n]]
        for k, s in enumerate(slots[:len(futures)]):
            log.info("slot %d (%s): %s", k, "as configured" if s is None else
                     f"cores {s['cpus']}" + (f", GPUs {s['gpus']}" if s["gpus"] else ""), d.backbones[k::n])
        while True:
            running = [f for f in futures if not f.state.is_final()]
            for url in runs:  # score what is committed, while training goes on
                score_(url, _committed(url, "all") if which == "all" else [])
            if not running:
                break
            running[0].wait(timeout=d.poll_seconds)
        for f in futures:
            f.result()  # a failed training job fails the pipeline here, with its reason
    stages["train (concurrent)" if n > 1 else "train"] = round(time.perf_counter() - t0, 1)
    for url in runs:
        score_(url, checkpoints_to_score(url, which))
    return {"runs": runs, "samples": samples, "stage_seconds": stages}


@flow(name="run_pipeline", flow_run_name=names.pipeline_name)
def run_pipeline(root: str | None = None, config: ConfigArg = "demo", backbones: list[str] | None = None) -> dict[str, Any]:
    """Run every stage; each is cached (a rerun with the same inputs does nothing) and resumable (a killed run
    continues). ``backbones`` (preset names) overrides the config's list; they all train on the same store
    (``diffusion.concurrency`` of them at once). The summary's ``stage_seconds`` holds each stage's wall time."""
    cfg = stage_config(root, config, **({"diffusion": {"backbones": list(backbones)}} if backbones else {}))
    conf = cfg.to_dict()
    log = get_run_logger()
    stages: dict[str, float] = {}
    t_flow = time.perf_counter()

    with _timed(stages, "data"):
        dataset = prepare_images(root=cfg.root, config=conf)
    # the evaluation's proxy classifier needs only the images: it trains beside the autoencoder (own process)
    extractor = prepare_extractor.submit(dataset["url"], dataclasses.asdict(cfg.evaluate))
    with _timed(stages, "autoencoder"):
        ae = train_autoencoder(dataset=dataset["url"], root=cfg.root, config=conf)
    with _timed(stages, "proxy classifier (after the AE)"):
        extractor.result()  # its failure stops the pipeline here, with its reason
    if cfg.evaluate.reconstruction:
        with _timed(stages, "evaluate autoencoder"):
            evaluate_autoencoder(ae=ae["url"], dataset=dataset["url"], root=cfg.root, config=conf)
    with _timed(stages, "encode"):
        store = encode_latents(ae=ae["url"], dataset=dataset["url"], root=cfg.root, config=conf)
    trained = train_backbones(store=store["url"], dataset=dataset["url"], root=cfg.root, config=conf)
    stages.update(trained["stage_seconds"])
    runs = trained["runs"]
    with _timed(stages, "figures"):
        for url in runs:
            if url in trained["samples"]:  # none when every checkpoint was pruned before it was scored
                draw_run_figures(root=cfg.root, run_url=url, samples_url=trained["samples"][url],
                                 dataset_url=dataset["url"], classes=cfg.evaluate.grid_classes,
                                 class_names=cfg.data.class_names, precision=cfg.sample.precision)
        plot_results(root=cfg.root)

    summary = outputs_summary(cfg.root)
    stages["in the flow"] = round(time.perf_counter() - t_flow, 1)
    summary["stage_seconds"] = stages
    log.info("outputs under %s: %s", cfg.root, {k: v for k, v in summary.items() if k != "table"})
    create_markdown_artifact(key="dcae15-pipeline", markdown=f"# dcae15 pipeline\n\n```\n{summary.get('table', '')}\n```\n"
                             + "\n".join(f"- {k}: `{v}`" for k, v in summary.items() if k != "table"),
                             description="where the pipeline's outputs are")
    publish_figures(summary.get("figures", []))  # one link artifact per PNG
    return summary
