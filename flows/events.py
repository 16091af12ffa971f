"""Prefect events a deployment trigger can react to: ``dcae15.checkpoint.saved`` when a training run commits a
checkpoint (its ``latest`` pointer written).

The trainer (``dcae15/``) knows nothing of Prefect: the flow watches the run directory while the trainer runs (in
this process or under torchrun) and emits one event per new ``latest`` step, plus a progress artifact. The
``evaluate-checkpoint`` deployment in ``prefect.yaml`` has a ``DeploymentEventTrigger`` on this event whose
parameters are templated from it; the hourly ``evaluate-new-checkpoints`` sweep stays as the safety net.

Event shape (resource labels are strings; the payload carries the same plus the config the run was started with):

    event:    dcae15.checkpoint.saved
    resource: prefect.resource.id = dcae15.run.<run_id>, prefect.resource.name = <run_id>,
              dcae15.run-url, dcae15.step, dcae15.checkpoint-url, dcae15.root, dcae15.backbone
    payload:  {run_url, step, checkpoint_url, root, backbone, config}
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from prefect.events import emit_event

from flows.artifacts import artifact_key, progress_while

__all__ = ["CHECKPOINT_SAVED", "checkpoint_resource", "emit_checkpoint_saved", "watch_training"]

CHECKPOINT_SAVED = "dcae15.checkpoint.saved"


def checkpoint_resource(run_url: str, step: int, checkpoint_url: str, root: str, backbone: str) -> dict[str, str]:
    """The event's resource: the training run, labelled with the checkpoint's step and URLs."""
    run_id = run_url.rstrip("/").rsplit("/", 1)[-1]
    return {"prefect.resource.id": f"dcae15.run.{run_id}", "prefect.resource.name": run_id,
            "dcae15.run-url": run_url, "dcae15.step": str(int(step)), "dcae15.checkpoint-url": checkpoint_url,
            "dcae15.root": root, "dcae15.backbone": backbone}


def emit_checkpoint_saved(run_url: str, step: int, checkpoint_url: str, *, root: str, backbone: str,
                          config: Any = None) -> Any:
    """Emit ``dcae15.checkpoint.saved`` for one committed checkpoint; returns the Event (None when events are off)."""
    payload = {"run_url": run_url, "step": int(step), "checkpoint_url": checkpoint_url, "root": root,
               "backbone": backbone, "config": config}
    return emit_event(CHECKPOINT_SAVED, resource=checkpoint_resource(run_url, step, checkpoint_url, root, backbone),
                      payload=payload)


def _flow_config() -> Any:
    """The enclosing flow run's ``config`` parameter (preset name, YAML path or dict), for the evaluation to reuse."""
    try:
        from prefect.runtime import flow_run

        return flow_run.parameters.get("config")
    except Exception:  # noqa: BLE001 - outside a flow run
        return None


@contextlib.contextmanager
def watch_training(run_url: str, *, root: str, backbone: str, steps: int, interval: float = 5.0) -> Iterator[None]:
    """While the body trains ``run_url``: emit one checkpoint event per newly committed step and keep a progress
    artifact (step / ``steps``) up to date. Checkpoints present before the body started are not announced again."""
    from dcae15.diffusion.checkpoint import checkpoint_url, list_checkpoints
    from dcae15.diffusion.train import latest_checkpoint

    def latest() -> tuple[int, str] | None:
        try:
            return latest_checkpoint(run_url)
        except FileNotFoundError:
            return None

    start = latest()
    state = {"announced": start[0] if start else -1}
    if start is not None:
        from prefect import get_run_logger

        get_run_logger().info("run %s: resuming from its checkpoint at step %d", run_url, start[0])
    config = _flow_config()

    def announce() -> None:
        now = latest()
        if now is None or now[0] <= state["announced"]:
            return
        # every committed step since the last poll (several may land between two polls), oldest first
        steps_ = [s for s in list_checkpoints(run_url) if state["announced"] < s < now[0]] + [now[0]]
        for step in steps_:
            url = now[1] if step == now[0] else checkpoint_url(run_url, step)
            emit_checkpoint_saved(run_url, step, url, root=root, backbone=backbone, config=config)
            state["announced"] = step

    def poll() -> tuple[float, float]:
        return float(max(state["announced"], 0)), float(steps)

    run_id = run_url.rstrip("/").rsplit("/", 1)[-1]
    with progress_while(artifact_key("progress-train", run_id), f"training {backbone}: {run_url}", poll, interval=interval,
                        on_poll=announce):
        yield
