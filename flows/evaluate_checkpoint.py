"""Score one diffusion checkpoint: what the ``evaluate-checkpoint`` deployment runs when a training run emits
``dcae15.checkpoint.saved`` (see flows/events.py and prefect.yaml).

Sampling and scoring are the ``sample`` and ``evaluate`` flows, so a checkpoint scored by this flow and again by the
hourly ``evaluate_new_checkpoints`` sweep hits the same caches and the same result row: one row, never two.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.common import ConfigArg, stage_config
from flows.names import evaluate_checkpoint_name

__all__ = ["evaluate_checkpoint"]


@flow(name="evaluate_checkpoint", flow_run_name=evaluate_checkpoint_name)
def evaluate_checkpoint(run: str, step: int, root: str | None = None, config: ConfigArg = "demo") -> dict[str, Any]:
    """Sample checkpoint ``step`` of the diffusion run at ``run`` and score it (one row in ``<root>/eval/results``).

    ``root`` defaults to the config's; the dataset is the one the run's latent store was encoded from. A checkpoint
    pruned before this run started is skipped with a warning (``{"kind": "skipped", ...}``).
    """
    from dcae15.diffusion.checkpoint import list_checkpoints, read_run_config
    from flows.evaluate import _dataset_of, evaluate
    from flows.sample import sample

    cfg = stage_config(root, config)
    step = int(step)
    present = list_checkpoints(run)
    if step not in present:
        # pruned (keep_checkpoints) before this run started: expected when evaluation lags training, not an error
        get_run_logger().warning("run %s no longer has checkpoint %d (it has %s): not scored; raise "
                                 "diffusion.train.keep_checkpoints to score every checkpoint", run, step, present)
        return {"kind": "skipped", "run": run, "step": step, "reason": "checkpoint pruned"}
    dataset_url = _dataset_of(read_run_config(run)["store_url"], cfg.root)
    samples = sample(run=run, root=cfg.root, config=config, checkpoint=step)
    return evaluate(samples=samples["url"], dataset=dataset_url, root=cfg.root, config=config)
