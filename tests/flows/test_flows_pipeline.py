"""The pipeline end to end on the tiny preset: outputs, caching (second run does nothing), a changed diffusion config
recomputes only what is downstream, and a cached pointer whose artifact is damaged recomputes."""

from __future__ import annotations

import datetime as dt
import os

import pytest

STAGES = {"pack_images", "fit_autoencoder", "encode_store", "fit_backbone", "draw_samples", "score_samples"}

pytestmark = pytest.mark.slow


def _now():
    return dt.datetime.now(dt.timezone.utc)


def _run(results_dir, cfg):
    from flows.pipeline import run_pipeline as pipeline

    return pipeline.with_options(result_storage=results_dir)(root=cfg["root"], config=cfg)


def test_pipeline_outputs_cache_and_partial_recompute(prefect_api, tmp_path, results_dir, tiny_config,
                                                    task_states_since):
    """The one test of the pipeline's caching as Prefect records it: all six stages Completed, then all Cached
    with no artifact touched, then a changed diffusion config recomputing only what is downstream, then a damaged
    store unit recomputed alone. Long (~47 s on a quiet 2-core machine) because it needs four pipeline runs on one
    root; the stages' own caching is unit-tested faster elsewhere, but not Prefect's view of it."""
    root = tmp_path / "root"
    cfg = tiny_config(root)

    t0 = _now()
    summary = _run(results_dir, cfg)
    states = task_states_since(t0, STAGES)
    for stage in STAGES:
        assert states[stage] == ["Completed"], (stage, states)
    assert summary["store"].startswith(str(root / "latents"))
    assert len(summary["runs"]) == 1 and "DiT-tiny" in summary["runs"][0]
    assert "proxy-fid" in summary["table"]
    assert summary["figures"] and all(f.endswith(".png") and os.path.getsize(f) > 0 for f in summary["figures"])
    ckpt = root / "runs" / "diffusion"
    stamps = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()}

    # same inputs: every stage comes from the cache, and no artifact is touched
    t1 = _now()
    assert _run(results_dir, cfg)["runs"] == summary["runs"]
    states = task_states_since(t1, STAGES)
    for stage in STAGES:
        assert states[stage] == ["Cached"], (stage, states)
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()} == stamps

    # a changed diffusion config: data, AE and store stay cached; training, sampling and scoring run again
    cfg2 = tiny_config(root, diffusion={"train": {"lr": 2e-4}})  # a new run id (steps alone would extend the run)
    t2 = _now()
    second = _run(results_dir, cfg2)
    states = task_states_since(t2, STAGES)
    assert {s: states[s] for s in ("pack_images", "fit_autoencoder", "encode_store")} == {
        "pack_images": ["Cached"], "fit_autoencoder": ["Cached"], "encode_store": ["Cached"]}
    assert {s: states[s] for s in ("fit_backbone", "draw_samples", "score_samples")} == {
        "fit_backbone": ["Completed"], "draw_samples": ["Completed"], "score_samples": ["Completed"]}
    assert len(second["runs"]) == 2

    # a damaged artifact behind a cached pointer: the store loses a unit marker -> encode recomputes that unit only
    from storage.latent_store import LatentStore

    marker_dir = root / "latents" / os.path.basename(summary["store"]) / "_dcae15" / "units"
    before = {p.name: p.stat().st_mtime_ns for p in marker_dir.glob("*.json")}
    lost = sorted(before)[0]
    (marker_dir / lost).unlink()
    assert LatentStore.open(summary["store"]).missing_units() == [0]
    t3 = _now()
    _run(results_dir, cfg)
    states = task_states_since(t3, STAGES)
    assert sorted(states["encode_store"]) == ["Cached", "Completed"], states  # cached pointer found stale, then recomputed
    assert states["fit_backbone"] == ["Cached"]  # the recomputed store is the same store: downstream stays cached
    assert LatentStore.open(summary["store"]).is_complete
    after = {p.name: p.stat().st_mtime_ns for p in marker_dir.glob("*.json")}
    assert {k for k in before if after.get(k) != before[k]} == {lost}  # only the damaged unit was rewritten


def test_torchrun_failure_is_a_failed_flow_run_with_the_reason(prefect_api, tmp_path, results_dir, tiny_config):
    """A child that exits non-zero fails the flow run; the state message carries the exit status and its last lines.
    The store is written through storage's API: the launch fails before any rank reads it, so prepare -> AE ->
    encode would add ~15 s and prove nothing here."""
    from flows.diffusion import train_diffusion
    from tests.diffusion.conftest import make_latent_store

    cfg = tiny_config(tmp_path / "root")
    store = make_latent_store(str(tmp_path / "root" / "store"), n=32, c=8)
    state = train_diffusion.with_options(result_storage=results_dir)(
        store=store, backbone="DiT-tiny", root=cfg["root"], config=cfg, nproc_per_node=2,
        torchrun_args=["--no-such-torchrun-flag"], return_state=True)
    assert state.is_failed()
    assert "exit status 2" in state.message and "--no-such-torchrun-flag" in state.message
