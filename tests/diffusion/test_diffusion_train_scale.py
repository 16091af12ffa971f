"""Trainer at scale, on CPU: fused EMA, gradient accumulation, elastic data layout, async checkpoints vs kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dcae15.diffusion.checkpoint import load_ema_state, read_latest, read_run_config, read_train_state
from dcae15.diffusion.data import RankBatches, layout_ranks
from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion
from dcae15.models import ModelConfig, build_model
from storage.reader import LatentStreamDataset

REPO = Path(__file__).resolve().parents[2]


def _weights(run: str, step: int, which: str) -> dict[str, torch.Tensor]:
    m = build_model(ModelConfig(**read_run_config(run)["model_config"]))
    load_ema_state(f"{run}/checkpoints/step-{step:07d}", m, which=which)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_weights(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], lr: float, what: str) -> None:
    """Two runs that differ only in the order of fp32 sums hold the same weights, tensor by tensor, up to rounding.

    No elementwise fp32 bound survives AdamW: its normalised step m / (sqrt(v) + eps) turns a rounding-level
    difference in a near-zero gradient into up to ~lr of difference in that one weight. So each tensor's mean
    |difference| must stay below lr / 100: a tensor updated from other data (a missed all-reduce, a wrong slice) moves
    ~lr per step elsewhere, a mean of the order of lr / 2; the equal runs here sit at ~1e-10 on average (max 2.5e-7)
    under ATEN_CPU_CAPABILITY=default, avx2 and avx512.
    """
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            d = (wa[k].double() - wb[k].double()).abs().mean().item()
            assert d < lr / 100, f"{what} {k}: mean |diff| {d:.3g}"


def _cfg(**kw) -> DiffusionTrainConfig:
    base = dict(model="DiT-tiny", global_batch_size=16, steps=4, lr=1e-3, checkpoint_every=100, log_every=1,
                ema_decay=0.9, progress=False, shuffle_chunks=2)
    return DiffusionTrainConfig(**{**base, **kw})


def test_layout_ranks():
    assert layout_ranks(16, 2, 2, 1) == [(1, 0, 8)]  # unchanged world size: its own reader, whole batch
    assert layout_ranks(16, 1, 2, 1) == [(0, 8, 16)]  # 1 -> 2: the second half of the single reader's batch
    assert layout_ranks(16, 2, 1, 0) == [(0, 0, 8), (1, 0, 8)]  # 2 -> 1: both readers
    assert layout_ranks(12, 2, 3, 1) == [(0, 4, 6), (1, 0, 2)]  # a share straddling two readers
    with pytest.raises(ValueError, match="divisible"):
        layout_ranks(16, 3, 2, 0)


def _global_batches(store, dws: int, ws: int, gb: int, steps: int, states=None) -> tuple[list, list]:
    """``steps`` global batches (row indices) read by ``ws`` ranks over a layout of ``dws`` reader ranks."""
    per_rank, last = [], {}
    for r in range(ws):
        sources = []
        for q, lo, hi in layout_ranks(gb, dws, ws, r):
            ds = LatentStreamDataset(store, batch_size=gb // dws, seed=1, rank=q, world_size=dws, shuffle_chunks=2)
            if states:
                ds.load_state_dict(states[q])
            sources.append((q, iter(ds), lo, hi))
        it = RankBatches(sources)
        rows = []
        for _ in range(steps):
            b = next(it)
            rows.append(b["indices"])
            last.update(b["states"])
        per_rank.append(rows)
    batches = [torch.cat([per_rank[r][k] for r in range(ws)]).tolist() for k in range(steps)]
    return batches, [last[q] for q in range(dws)]


@pytest.mark.parametrize("dws,ws", [(1, 2), (2, 1)])
def test_elastic_layout_continues_the_same_global_batches(latent_store, dws, ws):
    """The data position after k steps depends only on the global samples consumed: a resume on another world size
    reads exactly the global batches the original world size would have read (no repeat, no skip)."""
    ref, _ = _global_batches(latent_store, dws, dws, 16, 12)  # 12 x 16 rows: crosses an epoch of 128
    _, states = _global_batches(latent_store, dws, dws, 16, 5)
    resumed, _ = _global_batches(latent_store, dws, ws, 16, 7, states)
    assert resumed == ref[5:]
    epoch = [i for b in ref[:8] for i in b]  # one epoch at this layout: every row exactly once
    assert sorted(epoch) == list(range(128))


@pytest.mark.concurrency
def test_prefetcher_keeps_order_reraises_and_closes():
    from dcae15.diffusion.data import DevicePrefetcher

    def source():
        for i in range(3):
            yield {"latents": torch.full((2, 1), float(i)), "labels": torch.tensor([i, i]), "states": {0: i}}
        raise OSError("store went away")

    pre = DevicePrefetcher(source(), torch.device("cpu"), depth=2)
    got = [next(pre) for _ in range(3)]
    assert [b["states"][0] for b in got] == [0, 1, 2] and got[2]["latents"].device.type == "cpu"
    with pytest.raises(OSError, match="went away"):  # the reader's error reaches the training thread
        next(pre)
    pre.close()
    assert not pre.thread.is_alive()
    endless = DevicePrefetcher(iter(lambda: {"latents": torch.zeros(1), "labels": torch.zeros(1)}, None),
                               torch.device("cpu"), depth=1)
    next(endless)
    endless.close()  # a producer blocked on a full queue stops too
    assert not endless.thread.is_alive()


@pytest.mark.numerics
def test_sharded_ema_matches_a_loop():
    from dcae15.ema import EMA
    from dcae15.parallel import apply_parallelism, make_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="dit", hidden=32, depth=2, heads=2, in_channels=4, input_size=(4, 4),
                                        num_classes=3))
        apply_parallelism(model, mesh=make_mesh(torch.device("cpu"), 1), device=torch.device("cpu"),
                          mixed_precision="fp32")
        ema = EMA(model)
        ref = {n: t.full_tensor().clone() for n, t in ema.shadow.items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for decay in (0.5, 0.9):
            model(torch.randn(2, 4, 4, 4), torch.tensor([1.0, 500.0]), torch.tensor([0, 2])).sub(1).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update(decay)
            for n, p in model.named_parameters():
                ref[n] = ref[n] + (1 - decay) * (p.detach().full_tensor() - ref[n])
        for n, t in ema.shadow.items():
            # the fused update (lerp) vs sub-mul-add above: a few fp32 roundings (u ~ 6e-8) of |values| <= ~1, twice
            torch.testing.assert_close(t.full_tensor(), ref[n], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(t.full_tensor(), p.detach().full_tensor())
                   for t, p in zip(ema.shadow.values(), model.parameters()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.numerics
def test_grad_accum_equals_the_larger_batch(latent_store, tmp_path):
    """4 micro-batches of 4 give the update of one batch of 16 (same data, same noise) up to fp rounding."""
    adt = {"mode": "per_sample", "include_full": True}
    a = train_diffusion(_cfg(steps=3, adt=adt), latent_store, str(tmp_path / "a"))
    b = train_diffusion(_cfg(steps=3, adt=adt, grad_accum_steps=4), latent_store, str(tmp_path / "b"))
    assert a["run_id"] == b["run_id"]  # accumulation is a runtime choice, not another run
    for which in ("model", "ema"):
        wa, wb = _weights(a["run_url"], 3, which), _weights(b["run_url"], 3, which)
        _assert_same_weights(wa, wb, _cfg().lr, which)
    # Adam hides a constant gradient scale: the logged loss and gradient norm show it. On the first step both runs
    # hold the same weights: 4 micro-batch sums + one accumulation instead of one sum of 16 x 32 x 4 x 4 = 8192 terms
    # per loss (and per gradient element, at most) differ by <= ~log2(8192) u ~ 13 x 6e-8 ~ 1e-6 relative (fp32
    # blocked summation, same-signed terms); x10 for cancellation. Later steps add the weights' own rounding
    # differences above (seen: <= 1.2e-7 relative on every step, default / avx2 / avx512 kernels).
    for key in ("loss", "grad_norm"):
        la = [json.loads(x)[key] for x in Path(a["run_url"], "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(x)[key] for x in Path(b["run_url"], "metrics.jsonl").read_text().splitlines()]
        assert la == pytest.approx(lb, rel=1e-5), key
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train_diffusion(_cfg(grad_accum_steps=3), latent_store, str(tmp_path / "c"))


def _torchrun(nproc: int, spec: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "tests" / "diffusion" / "torchrun_runs.py"), json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.numerics
def test_hsdp_4_gloo_ranks_matches_fsdp(latent_store, tmp_path):
    """One launch of 4 processes: FSDP over 4 ranks and HSDP (2 replicas x 2 shards) give the same run."""
    cfg = _cfg(steps=2).to_dict()
    runs = [str(tmp_path / "fsdp"), str(tmp_path / "hsdp")]
    _torchrun(4, {"jobs": [{"cfg": cfg, "store": latent_store, "run": runs[0]},
                           {"cfg": {**cfg, "hsdp_shard_size": 2}, "store": latent_store, "run": runs[1]}],
                  "check_hsdp": 2})
    for which in ("model", "ema"):
        wa, wb = _weights(runs[0], 2, which), _weights(runs[1], 2, which)
        _assert_same_weights(wa, wb, _cfg().lr, which)  # another reduction order (reduce-scatter, then all-reduce)


def _reader_states(store: str, dws: int, batches: int) -> list[dict]:
    out = []
    for q in range(dws):
        it = iter(LatentStreamDataset(store, batch_size=16 // dws, seed=0, rank=q, world_size=dws, shuffle_chunks=2))
        for _ in range(batches):
            state = next(it)["state"]
        out.append(state)
    return out


@pytest.mark.slow
def test_elastic_resume_1_to_2_and_2_to_1(latent_store, tmp_path):
    """Checkpointed at 1 rank, resumed at 2 (and the other way): the data position carries over exactly."""
    cfg = _cfg(steps=4, checkpoint_every=2)
    up, down = str(tmp_path / "up"), str(tmp_path / "down")
    train_diffusion(cfg, latent_store, up, max_steps=2)
    _torchrun(2, {"jobs": [{"cfg": cfg.to_dict(), "store": latent_store, "run": up},
                           {"cfg": cfg.to_dict(), "store": latent_store, "run": down, "max_steps": 2}]})
    train_diffusion(cfg, latent_store, down)
    for run, dws, ws in ((up, 1, 2), (down, 2, 1)):
        st = read_train_state(f"{run}/checkpoints/step-0000004")
        assert (st["step"], st["data_world_size"], st["world_size"]) == (4, dws, ws)
        assert st["readers"] == _reader_states(latent_store, dws, 4)  # as if never interrupted
        assert [json.loads(x)["step"] for x in Path(run, "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        assert all(torch.isfinite(v).all() for v in _weights(run, 4, "model").values())


_SLOW_SAVE = """
import json, os, sys, time
from torch.distributed.checkpoint import FileSystemWriter
import dcae15.diffusion.train as tr
from dcae15.checkpointer import Checkpointer
saving, past = sys.argv[4], sys.argv[5]
class SlowWriter(FileSystemWriter):
    def write_data(self, plan, planner):
        if str(self.path).endswith("step-0000004"):
            open(saving, "w").close()
            time.sleep(3600)  # the parent kills the process here, in the middle of the async save
        return super().write_data(plan, planner)
save = Checkpointer.save
def save_past_4(self, step, write):
    if step == 6 and self.in_flight == 4:  # training went on past step 4 while that save hangs
        open(past, "w").close()
    return save(self, step, write)
Checkpointer.save = save_past_4
tr.dcp_writer = lambda url, storage_options=None: SlowWriter(url)
tr.train_diffusion(tr.DiffusionTrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])
"""


@pytest.mark.concurrency
@pytest.mark.slow
def test_kill_during_async_save_keeps_latest_complete(latent_store, tmp_path):
    """SIGKILLed while the async save of step 4 hangs and training has gone on to step 6 (two explicit points the
    trainer reports: the save is writing, the next save waits for it), the run's ``latest`` still names step 2, the
    cut checkpoint is incomplete, and the resumed run equals the uninterrupted one bit for bit."""
    cfg = _cfg(steps=6, checkpoint_every=2)
    ref = train_diffusion(cfg, latent_store, str(tmp_path / "ref"))
    run, saving, past = str(tmp_path / "run"), tmp_path / "saving", tmp_path / "past-4"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, json.dumps(cfg.to_dict()), latent_store, run,
                             str(saving), str(past)], env=env, cwd=REPO)
    try:
        deadline = time.time() + 300  # only turns a hang into a failure
        while not (saving.exists() and past.exists()):
            assert proc.poll() is None and time.time() < deadline, "trainer ended before the slow save"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_latest(run)["step"] == 2  # never the checkpoint whose save was cut
    assert not (tmp_path / "run" / "checkpoints" / "step-0000004" / ".metadata").exists()
    out = train_diffusion(cfg, latent_store, run)  # resume from step 2
    assert out["step"] == 6
    for which in ("model", "ema"):  # and the resumed run is the uninterrupted one, bit for bit
        wa, wb = _weights(ref["run_url"], 6, which), _weights(run, 6, which)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), which


def test_nan_guard_reads_the_flag_every_log_every_steps(latent_store, tmp_path):
    """No host sync per step: a blow-up at step 2 is seen at the step-4 check, which stops the run unsaved; the
    first bad step is named."""
    from dcae15.diffusion.train import NonFiniteLossError

    cfg = _cfg(lr=1e30, steps=8, log_every=4, checkpoint_every=4, grad_clip=0)
    with pytest.raises(NonFiniteLossError, match=r"^step 2: .*stopped at step 4 without saving"):
        train_diffusion(cfg, latent_store, str(tmp_path / "nan"))
    assert read_latest(str(tmp_path / "nan")) is None and not (tmp_path / "nan" / "checkpoints").exists()


def test_cosine_schedule_makes_steps_part_of_the_run_identity():
    from dcae15.diffusion.train import DiffusionTrainConfig, run_id_for

    const = [DiffusionTrainConfig(steps=s) for s in (100, 200)]
    cos = [DiffusionTrainConfig(steps=s, schedule="cosine") for s in (100, 200)]
    assert "schedule" not in const[0].identity()  # constant-lr run ids as before the field existed
    assert run_id_for(const[0], "s") == run_id_for(const[1], "s")  # a longer constant-lr run continues the shorter
    assert run_id_for(cos[0], "s") != run_id_for(cos[1], "s") != run_id_for(const[1], "s")
    with pytest.raises(ValueError, match="schedule"):
        DiffusionTrainConfig(schedule="linear")
