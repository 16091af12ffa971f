"""Trainer: exact resume (world size 1 in-process, 2 via torchrun/gloo), NaN guard, one store for many backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dcae15.diffusion.checkpoint import load_ema_state, read_latest, read_run_config
from dcae15.diffusion.train import DiffusionTrainConfig, NonFiniteLossError, train_diffusion
from dcae15.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _weights(run: str, step: int, which: str) -> dict[str, torch.Tensor]:
    conf = read_run_config(run)
    m = build_model(ModelConfig(**conf["model_config"]))
    load_ema_state(f"{run}/checkpoints/step-{step:07d}", m, which=which)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_run(a: str, b: str, step: int) -> None:
    for which in ("model", "ema"):
        wa, wb = _weights(a, step, which), _weights(b, step, which)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{which} {k} differs after resume"
    la = [json.loads(x)["loss"] for x in Path(a, "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in Path(b, "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def _cfg(**kw) -> DiffusionTrainConfig:
    base = dict(model="DiT-tiny", global_batch_size=16, steps=6, lr=1e-3, checkpoint_every=100, log_every=1,
                ema_decay=0.9, progress=False, shuffle_chunks=2)
    return DiffusionTrainConfig(**{**base, **kw})


def test_exact_resume_world_size_1(latent_store, tmp_path):
    cfg = _cfg(adt={"mode": "per_sample", "include_full": True})
    full = train_diffusion(cfg, latent_store, str(tmp_path / "a"))
    assert full["step"] == 6 and full["done"]
    part = train_diffusion(cfg, latent_store, str(tmp_path / "b"), max_steps=3)
    assert part["step"] == 3 and not part["done"] and read_latest(str(tmp_path / "b"))["step"] == 3
    train_diffusion(cfg, latent_store, str(tmp_path / "b"))
    _assert_same_run(str(tmp_path / "a"), str(tmp_path / "b"), 6)
    # run dir layout + an already-finished run returns its pointer at once
    conf = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert conf["run_id"] == full["run_id"] and conf["model_config"]["in_channels"] == 32
    again = train_diffusion(cfg, latent_store, str(tmp_path / "a"))
    assert again["step"] == 6 and again["checkpoint"] == full["checkpoint"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "grad_norm", "img_per_s", "tokens_per_s"} <= rows[0].keys()


def _dcp_keys(run: str, step: int) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(f"{run}/checkpoints/step-{step:07d}").read_metadata().state_dict_metadata
    return {k: getattr(v, "size", None) for k, v in md.items()}


def test_one_rank_plain_and_fsdp_checkpoints_resume_into_each_other(latent_store, tmp_path):
    """One rank trains the plain module (no FSDP2); its DCP checkpoint has the sharded path's keys and shapes, and a
    run switched between the two paths midway (either way) ends bit for bit where the unswitched run does."""
    plain, fsdp = _cfg(adt={"mode": "per_batch"}), _cfg(adt={"mode": "per_batch"}, fsdp_one_rank=True)
    runs = {k: str(tmp_path / k) for k in ("plain", "fsdp", "plain_to_fsdp", "fsdp_to_plain")}
    train_diffusion(plain, latent_store, runs["plain"])
    train_diffusion(fsdp, latent_store, runs["fsdp"], max_steps=3)
    assert _dcp_keys(runs["plain"], 6).keys() >= {"app.model.blocks.0.attn.qkv.weight", "app.ema.final_layer.linear.weight"}
    assert _dcp_keys(runs["plain"], 6) == _dcp_keys(runs["fsdp"], 3)  # same names and global shapes
    train_diffusion(plain, latent_store, runs["plain_to_fsdp"], max_steps=3)
    train_diffusion(fsdp, latent_store, runs["plain_to_fsdp"])
    train_diffusion(fsdp, latent_store, runs["fsdp_to_plain"], max_steps=3)
    train_diffusion(plain, latent_store, runs["fsdp_to_plain"])
    for other in ("plain_to_fsdp", "fsdp_to_plain"):
        for which in ("model", "ema"):
            wa, wb = _weights(runs["plain"], 6, which), _weights(runs[other], 6, which)
            for k in wa:
                assert torch.equal(wb[k], wa[k]), f"{other} {which} {k}"


def _torchrun(cfg: DiffusionTrainConfig, store: str, run: str, tmp: Path, max_steps: int | None = None) -> None:
    conf = tmp / "run.yaml"
    conf.write_text(yaml.safe_dump({"store_url": store, "run_url": run, "train": cfg.to_dict()}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dcae15.diffusion.train", "--config", str(conf)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_exact_resume_world_size_2_torchrun(latent_store, tmp_path):
    """Two launches (a launch costs ~15 s on 2 cores): the CLI stops run b at step 2; a second launch runs a whole
    and resumes b from its checkpoint in new processes, so the resume reads only what the first launch wrote."""
    cfg = _cfg(model="USiT-tiny", steps=4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _torchrun(cfg, latent_store, b, tmp_path, max_steps=2)
    assert read_latest(b)["step"] == 2
    jobs = [{"cfg": cfg.to_dict(), "store": latent_store, "run": run} for run in (a, b)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "diffusion" / "torchrun_runs.py"), json.dumps({"jobs": jobs})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_run(a, b, 4)
    # the 2-rank checkpoint reshards into one unsharded model for sampling
    assert all(torch.isfinite(v).all() for v in _weights(a, 4, "ema").values())


def test_nan_guard_keeps_last_good_checkpoint(latent_store, tmp_path):
    cfg = _cfg(lr=1e30, steps=5, checkpoint_every=1, grad_clip=0)
    run = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match="not finite") as err:
        train_diffusion(cfg, latent_store, run)
    latest = read_latest(run)
    assert latest is not None and f"step {latest['step'] + 1}" in str(err.value)
    assert not (tmp_path / "nan" / "checkpoints" / f"step-{latest['step'] + 1:07d}").exists()
    assert all(torch.isfinite(v).all() for v in _weights(run, latest["step"], "model").values())


def test_two_backbones_share_one_store(latent_store, tmp_path):
    from storage.latent_store import LatentStore

    before = LatentStore.open(latent_store).verify()
    runs = [train_diffusion(_cfg(model=m, steps=2), latent_store, str(tmp_path / m)) for m in ("UViT-tiny", "SiT-tiny")]
    assert runs[0]["store_id"] == runs[1]["store_id"] and runs[0]["run_id"] != runs[1]["run_id"]
    assert LatentStore.open(latent_store).verify() == before  # nothing re-encoded or rewritten
    with pytest.raises(ValueError, match="global_batch_size"):
        DiffusionTrainConfig(global_batch_size=0)
    with pytest.raises(ValueError, match="unknown model preset"):
        DiffusionTrainConfig(model="DiT-huge")


def test_operational_fields_and_more_steps_continue_the_same_run(latent_store, tmp_path):
    """One identity rule: a config changed only in operational fields (checkpoint cadence, logging, prefetch,
    async saves) and in steps has the flows' run id (``run_id_for``) of the shorter run, and the trainer continues
    the finished run exactly as one uninterrupted run of the longer config."""
    from dcae15.diffusion.train import run_id_for, store_info

    sid = store_info(latent_store)["store_id"]
    short = _cfg(steps=2, checkpoint_every=1, keep_checkpoints=1, async_checkpoint=False, prefetch_batches=1)
    longer = _cfg(steps=4, checkpoint_every=3, keep_checkpoints=3, async_checkpoint=True, prefetch_batches=2)
    assert run_id_for(short, sid) == run_id_for(longer, sid) != run_id_for(_cfg(steps=2, lr=2e-3), sid)
    run, straight = str(tmp_path / run_id_for(short, sid)), str(tmp_path / "straight")
    assert train_diffusion(short, latent_store, run)["done"]
    out = train_diffusion(longer, latent_store, run)
    assert out["step"] == 4 and out["done"] and out["run_id"] == run_id_for(short, sid)
    train_diffusion(longer, latent_store, straight)
    _assert_same_run(run, straight, 4)
    assert json.loads(Path(run, "done.json").read_text())["steps"] == 4
    with pytest.raises(ValueError, match="belongs to another run"):  # the identity check of the run directory
        train_diffusion(_cfg(steps=2, lr=2e-3), latent_store, run)


def test_ema_every_k_steps_is_the_decay_to_the_kth_power_and_resumes_exactly(latent_store, tmp_path):
    """ema_every=3 (ema-pytorch's update_every): the EMA moves only at steps 3 and 6, by decay**3 toward the
    weights of that step; resuming at step 4 gives the same run; 1 (the default) keeps the run ids of before."""
    from dcae15.diffusion.train import run_id_for

    assert run_id_for(_cfg(), "s") == run_id_for(_cfg(ema_every=1), "s") != run_id_for(_cfg(ema_every=3), "s")
    cfg = _cfg(ema_every=3, ema_warmup=False, checkpoint_every=1, keep_checkpoints=10)
    full = train_diffusion(cfg, latent_store, str(tmp_path / "a"))
    run = str(tmp_path / "a")
    ema = {s: _weights(run, s, "ema") for s in range(1, 7)}
    model = {s: _weights(run, s, "model") for s in range(1, 7)}
    init = _weights(run, 2, "ema")  # steps 1-2 leave the EMA at the initial weights
    for k in init:
        if not init[k].is_floating_point():
            continue
        assert torch.equal(ema[1][k], init[k]) and torch.equal(ema[4][k], ema[3][k])
        for s in (3, 6):
            # the update in float64 from the fp32 weights; the trainer's fp32 lerp rounds m - e, the weight, the product
            # and the sum, <= u32 = 2**-24 each: within 4 u32 (|e| + |m - e|) of it, element by element (seen 1.0 u32)
            e, m = ema[s - 1][k].double(), model[s][k].double()
            expect = e + (1 - 0.9 ** 3) * (m - e)
            err = (ema[s][k].double() - expect).abs()
            assert (err <= 4 * 2.0 ** -24 * (e.abs() + (m - e).abs())).all(), (k, s, err.max())
    part = train_diffusion(cfg, latent_store, str(tmp_path / "b"), max_steps=4)
    assert part["step"] == 4
    train_diffusion(cfg, latent_store, str(tmp_path / "b"))
    _assert_same_run(run, str(tmp_path / "b"), 6)
    assert full["done"]
    with pytest.raises(ValueError, match="ema_every"):
        _cfg(ema_every=0)
