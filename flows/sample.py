"""Stage 5: sample a trained run (its latest or a given checkpoint) into a resumable sample store — in this process,
or on every GPU via torchrun with the ``diffusion`` section's launch settings (like training)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_pointer, requests_shown, sample_progress
from flows.caching import run_cached, stage_cache
from flows.common import ConfigArg, stage_config
from flows.launch import in_process, run_torchrun
from flows.machine import GPU_TAG, gpu_slot
from flows.pointers import describe_run, describe_samples

__all__ = ["draw_samples", "sample_outputs", "sample_run"]


@task(cache_policy=stage_cache("launch"), persist_result=True, result_serializer="json", tags=[GPU_TAG])
def draw_samples(root: str, run: dict[str, Any], checkpoint: int, spec: dict[str, Any],
                 launch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample ``spec['num_samples']`` images from ``run`` at ``checkpoint`` into ``<root>/samples/<id>``.

    ``launch`` (as for training: launcher, nproc_per_node, nnodes, torchrun_args) is not part of the cache key:
    the images do not depend on how many processes drew them. One writer per sample store: the sampler (its rank 0)
    holds the store's lease (storage/lease.py); a second sampling of it waits, then finds its units done.
    """
    import json

    from dcae15.diffusion.sample import sample_to_store
    from storage.fingerprint import short_id
    from storage.layout import Root

    log = get_run_logger()
    sid = short_id(run["run_id"], checkpoint, spec)
    out_url = Root(root).sample_store(sid)
    launch = launch or {"launcher": "inprocess", "nproc_per_node": 1, "nnodes": 1, "torchrun_args": []}
    log.info("sampling %s step %d -> %s (%s)", run["url"], checkpoint, out_url, spec)
    with (requests_shown("sample store", sid),
          gpu_slot(),  # one GPU job per machine unless asked (flows/machine.py)
          sample_progress(out_url, run["run_id"], checkpoint)):  # a progress artifact polled from the store
        if in_process(launch):
            sample_to_store(run["url"], out_url, checkpoint=checkpoint, progress=True, **spec)
        else:
            run_torchrun(launch, "dcae15.diffusion.sample",
                         [run["url"], out_url, "--checkpoint", str(checkpoint), "--spec", json.dumps(spec)], log=log.info)
    return describe_samples(out_url)


@flow(name="sample_run", flow_run_name=names.sample_name)
def sample_run(run: str, root: str | None = None, config: ConfigArg = "demo", checkpoint: int | None = None) -> dict[str, Any]:
    """Sample the diffusion run at ``run`` (checkpoint step ``checkpoint``, default the latest) per the ``sample`` section."""
    cfg = stage_config(root, config)
    latest = describe_run(run)
    step = latest["step"] if checkpoint is None else int(checkpoint)
    # the run's identity, not its latest step: sampling step 100 stays cached while training goes on
    ref = {"url": latest["url"], "run_id": latest["run_id"]}
    d = cfg.diffusion
    launch = d.launch()
    pointer = run_cached(draw_samples, root=cfg.root, run=ref, checkpoint=step, spec=cfg.sample.spec(), launch=launch)
    if cfg.sample.grid or cfg.sample.png_dir:
        pointer = {**pointer, "outputs": sample_outputs(pointer["url"], cfg.sample.grid, cfg.sample.png_dir)}
    return publish_pointer("sample", pointer)


@task
def sample_outputs(samples_url: str, grid: str | None, png_dir: str | None) -> dict[str, Any]:
    """The researcher's views of a finished store: a PNG grid and/or a folder of PNGs (not cached: cheap, and the
    files are the check)."""
    from dcae15.diffusion.sample_outputs import write_grid, write_png_dir

    out: dict[str, Any] = {}
    if grid:
        out["grid"] = write_grid(samples_url, grid)
    if png_dir:
        out["png_dir"] = write_png_dir(samples_url, png_dir)
    return out
