"""Stage 5: sample a trained run (its latest or a given checkpoint) into a resumable sample store."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_pointer, sample_progress
from flows.caching import STAGE_CACHE, run_cached
from flows.common import ConfigArg, stage_config
from flows.diffusion import describe_run
from flows.gpu import GPU_TAG, gpu_stage

__all__ = ["describe_samples", "validate_samples", "draw_samples", "sample"]


def describe_samples(url: str) -> dict[str, Any]:
    """The pointer of a sample store: URL + size + whether every unit is written."""
    from storage.sample_store import SampleStore

    store = SampleStore.open(url, read_only=True)
    a = store.attrs
    return {"kind": "samples", "url": url, "run_id": a["run_id"], "step": int(a["checkpoint_step"]),
            "sampler": a["sampler"], "sampling_steps": int(a["steps"]), "cfg_scale": float(a["cfg_scale"]),
            "num_samples": store.num_samples, "complete": not store.missing_units()}


def validate_samples(pointer: dict[str, Any]) -> str | None:
    """None if the sample store is there with every unit written; else what is wrong."""
    try:
        now = describe_samples(pointer["url"])
    except Exception as exc:  # noqa: BLE001 - a missing store means "recompute"
        return f"cannot open {pointer['url']}: {exc}"
    return None if now["complete"] else "sample store has missing units"


@task(cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json", tags=[GPU_TAG])
@gpu_stage  # one GPU job per machine unless asked (flows/gpu.py)
def draw_samples(root: str, run: dict[str, Any], checkpoint: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Sample ``spec['num_samples']`` images from ``run`` at ``checkpoint`` into ``<root>/samples/<id>``."""
    from dcae15.sampling import sample_to_store
    from storage.fingerprint import short_id
    from storage.urls import join

    out_url = join(root, "samples", short_id(run["run_id"], checkpoint, spec))
    get_run_logger().info("sampling %s step %d -> %s (%s)", run["url"], checkpoint, out_url, spec)
    with sample_progress(out_url, run["run_id"], checkpoint):  # a progress artifact polled from the store
        sample_to_store(run["url"], out_url, checkpoint=checkpoint, progress=True, **spec)
    return describe_samples(out_url)


@flow(name="sample", flow_run_name=names.sample_name)
def sample(run: str, root: str | None = None, config: ConfigArg = "demo", checkpoint: int | None = None) -> dict[str, Any]:
    """Sample the diffusion run at ``run`` (checkpoint step ``checkpoint``, default the latest) per the ``sample`` section."""
    cfg = stage_config(root, config)
    latest = describe_run(run)
    step = latest["step"] if checkpoint is None else int(checkpoint)
    # the run's identity, not its latest step: sampling step 100 stays cached while training goes on
    ref = {"url": latest["url"], "run_id": latest["run_id"]}
    return publish_pointer("sample", run_cached(draw_samples, validate_samples, root=cfg.root, run=ref, checkpoint=step,
                                                spec=dataclasses.asdict(cfg.sample)))
