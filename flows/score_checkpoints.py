"""Scoring diffusion checkpoints as they appear: one checkpoint (what the ``evaluate-checkpoint`` deployment runs when
a training run emits ``dcae15.checkpoint.saved``, see flows/events.py and prefect.yaml), and a sweep of every
checkpoint under a root that has no result row yet (the hourly safety net).

Both compose the ``sample_run`` and ``evaluate_samples`` flows, so a checkpoint scored by the event and again by the
sweep hits the same caches and the same result row: one row, never two.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows import names
from flows.common import ConfigArg, stage_config
from flows.evaluate import evaluate_samples
from flows.pointers import dataset_of
from flows.sample import sample_run

__all__ = ["evaluate_checkpoint", "evaluate_new_checkpoints"]


@flow(name="evaluate_checkpoint", flow_run_name=names.evaluate_checkpoint_name)
def evaluate_checkpoint(run: str, step: int, root: str | None = None, config: ConfigArg = "demo") -> dict[str, Any]:
    """Sample checkpoint ``step`` of the diffusion run at ``run`` and score it (one row in ``<root>/eval/results``).

    ``root`` defaults to the config's; the dataset is the one the run's latent store was encoded from. A checkpoint
    pruned before this run started is skipped with a warning (``{"kind": "skipped", ...}``).
    """
    from dcae15.diffusion.checkpoint import list_checkpoints, read_run_config

    cfg = stage_config(root, config)
    step = int(step)
    present = list_checkpoints(run)
    if step not in present:
        # pruned (keep_checkpoints) before this run started: expected when evaluation lags training, not an error
        get_run_logger().warning("run %s no longer has checkpoint %d (it has %s): not scored; raise "
                                 "diffusion.train.keep_checkpoints to score every checkpoint", run, step, present)
        return {"kind": "skipped", "run": run, "step": step, "reason": "checkpoint pruned"}
    dataset_url = dataset_of(read_run_config(run)["store_url"], cfg.root)
    samples = sample_run(run=run, root=cfg.root, config=config, checkpoint=step)
    return evaluate_samples(samples=samples["url"], dataset=dataset_url, root=cfg.root, config=config)


@flow(name="evaluate_new_checkpoints", flow_run_name=names.sweep_name)
def evaluate_new_checkpoints(root: str | None = None, config: ConfigArg = "demo") -> list[dict[str, Any]]:
    """Scan the root's diffusion runs and sample + score every checkpoint that has no result row yet.

    Meant for a cron schedule next to long training runs: each (checkpoint, metric config) is scored once.
    """
    from dcae15.diffusion.checkpoint import list_checkpoints, read_run_config
    from storage.layout import Root

    cfg = stage_config(root, config)
    log = get_run_logger()
    rows = []
    for run_url in Root(cfg.root).diffusion_runs():
        try:
            steps = list_checkpoints(run_url)
            conf = read_run_config(run_url)
            dataset_url = dataset_of(conf["store_url"], cfg.root)
        except FileNotFoundError as exc:
            log.info("skipping %s: %s", run_url, exc)  # a run that has not written its config / checkpoint yet
            continue
        factory = conf["model_config"].get("factory")
        if factory is not None:  # a backbone by import path: this process must be able to import it
            from dcae15.models.plugin import BackboneError, resolve_factory

            try:
                resolve_factory(factory)
            except BackboneError as exc:
                log.warning("skipping %s: %s", run_url, exc)  # the other runs are still scored
                continue
        for step in steps:
            samples = sample_run(run=run_url, root=cfg.root, config=config, checkpoint=step)
            rows.append(evaluate_samples(samples=samples["url"], dataset=dataset_url, root=cfg.root, config=config))
    log.info("%d checkpoints scored or already scored", len(rows))
    return rows
