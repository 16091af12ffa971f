"""One writer per artifact, with two real processes (issue 24): two trainings of one run and two samplings of one
checkpoint at the same moment give one writer and the result of a clean run; a holder SIGKILLed mid-run is taken
over and the run ends equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcae15.diffusion.checkpoint import load_ema_state, read_run_config
from dcae15.diffusion.sample import sample_to_store
from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion
from dcae15.models import ModelConfig, build_model
from storage.lease import Lease, LeaseConfig, claim
from storage.rundir import RunDir
from storage.sample_store import SampleStore
from storage.urls import join

pytestmark = [pytest.mark.slow, pytest.mark.concurrency]
JOBS = str(Path(__file__).with_name("one_writer_jobs.py"))
CFG = dict(model="DiT-tiny", global_batch_size=8, steps=30, lr=1e-3, checkpoint_every=5, log_every=5,
           ema_decay=0.9, progress=False, shuffle_chunks=2, async_checkpoint=False)


def _env() -> dict:
    """Read when a job starts: the S3 fixture sets its endpoint and keys in os.environ first."""
    return {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "DCAE15_LEASE_SECONDS": "3"}


def _job(spec: dict) -> list[str]:
    return [sys.executable, JOBS, json.dumps(spec)]


def _result(log: str) -> dict:
    return json.loads(log.strip().splitlines()[-1].removeprefix("RESULT "))


def _weights(run: str, step: int) -> dict[str, torch.Tensor]:
    m = build_model(ModelConfig(**read_run_config(run)["model_config"]))
    load_ema_state(join(run, "checkpoints", f"step-{step:07d}"), m, which="ema")
    return m.state_dict()


@pytest.fixture(scope="module")
def store_and_clean_run(tmp_path_factory, decodable_store_factory):
    """A latent store whose AE exists (sampling decodes), and the reference run trained alone in this process."""
    root = tmp_path_factory.mktemp("one-writer")
    store = decodable_store_factory(root)
    clean = train_diffusion(DiffusionTrainConfig(**CFG), store, str(root / "clean"))
    return root, store, clean


def test_two_trainings_of_one_run_one_killed_mid_run_other_takes_over(store_and_clean_run, commands, tmp_path):
    """Both meet at the run's lease (the test holds it until both wait); the one that trains stops once its
    checkpoint of step 10 is committed (a hook of the job script) and is killed there while the other waits."""
    _, store, clean = store_and_clean_run
    run = str(tmp_path / "runs" / clean["run_id"])  # this test's own (the module's store is shared)
    spec = {"job": "train", "cfg": CFG, "store": store, "run": run, "pause_at": 10}
    with claim(run, what="diffusion run", config=LeaseConfig(ttl=30)):
        jobs = commands([_job(spec), _job(spec)], _env())
        jobs.until(lambda logs: all("waiting: diffusion run" in log for log in logs))
    jobs.until(lambda logs: any("paused at step 10" in log for log in logs))  # the holder mid-run, step 10 committed
    victim = jobs.procs[next(i for i, log in enumerate(jobs.logs) if "paused at step 10" in log)]
    assert Lease(run).holder()["pid"] == victim.pid
    victim.send_signal(signal.SIGKILL)
    logs = jobs.finish(timeout=300)
    (k,) = [i for i, p in enumerate(jobs.procs) if p is not victim]
    log = logs[k]
    assert jobs.returncodes[k] == 0, log
    out = _result(log)
    assert "waiting: diffusion run" in log and "took over diffusion run" in log, log
    assert out["step"] == clean["step"] == 30 and out["done"] and out["run_id"] == clean["run_id"]
    a, b = _weights(clean["run_url"], 30), _weights(run, 30)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the taken-over run equals the uninterrupted one
    pick = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows]  # noqa: E731 - not the timings
    assert pick(RunDir(run).metrics()) == pick(RunDir(clean["run_url"]).metrics())
    assert Lease(run).holder() is None  # released


def test_two_samplings_of_one_checkpoint_on_s3_one_writer_same_images(store_and_clean_run, s3_server, meet_at_lease):
    """On the moto S3 server (the trainings above run on a local root)."""
    _, _, clean = store_and_clean_run
    out_root = s3_server.make_bucket()
    kw = dict(num_samples=16, sampler="ddim", steps=2, cfg_scale=2.0, seed=3, batch_size=4, chunk_size=4,
              progress=False, checkpoint=30)
    ref = SampleStore.open(sample_to_store(clean["run_url"], join(out_root, "ref"), **kw), read_only=True)
    out = join(out_root, "twice")
    # the two meet at the store's lease, held by the test until both wait for it
    codes, logs = meet_at_lease(out, "sample store", _job({"job": "sample", "run": clean["run_url"], "out": out,
                                                           "kw": kw}), _env())
    assert codes == [0, 0], logs
    # each said once that it waits, although the second waited twice (for the test, then for the first)
    assert [log.count("waiting: sample store") for log in logs] == [1, 1], logs
    images, labels = SampleStore.open(out, read_only=True).read_all()
    ref_images, ref_labels = ref.read_all()
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
