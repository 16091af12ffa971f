"""sample_to_store: decode with the store's AE (fingerprint checked), uint8 units, resume after a kill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcae15.ae.model import StructuredAutoencoder
from dcae15.diffusion.sample import sample_to_store
from dcae15.metrics.fidelity import uniform_labels
from dcae15.metrics.labels import make_labels
from storage.sample_store import SampleStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_run_factory):
    root = tmp_path_factory.mktemp("samp")
    return root, tiny_run_factory(root)


def test_sample_store_resumes_to_identical_images(trained_run, monkeypatch):
    root, run = trained_run
    kw = dict(num_samples=10, sampler="euler", steps=2, cfg_scale=2.0, seed=3, batch_size=4, chunk_size=4,
              progress=False, labels="balanced")
    ref = SampleStore.open(sample_to_store(run, str(root / "ref"), **kw))
    images, labels = ref.read_all()
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    assert sorted(np.bincount(labels, minlength=4).tolist()) == [2, 2, 3, 3]

    real_write, calls = SampleStore.write_unit, []

    def dying_write(self, unit, *a, **k):  # the job "dies" while writing its second unit
        calls.append(unit)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_write(self, unit, *a, **k)

    monkeypatch.setattr(SampleStore, "write_unit", dying_write)
    with pytest.raises(KeyboardInterrupt):
        sample_to_store(run, str(root / "resumed"), **kw)
    monkeypatch.setattr(SampleStore, "write_unit", real_write)
    assert SampleStore.open(str(root / "resumed")).missing_units() == [1, 2]
    sample_to_store(run, str(root / "resumed"), **kw)
    again, again_labels = SampleStore.open(str(root / "resumed")).read_all()
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)


def test_wrong_autoencoder_is_refused(trained_run):
    root, run = trained_run
    torch.manual_seed(1)
    other = StructuredAutoencoder.from_preset("tiny-f8c32").save_pretrained(str(root / "other-ae"))
    with pytest.raises(ValueError, match="fingerprint"):
        sample_to_store(run, str(root / "bad"), num_samples=2, ae_url=other, progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        sample_to_store(run, str(root / "bad2"), num_samples=2, sampler="ddpm", progress=False)


def test_uniform_samples_carry_the_labels_their_evaluation_draws(trained_run):
    """One label rule: the labels a sample store holds are the ones ``uniform_labels`` gives for the same seed."""
    root, run = trained_run
    for seed in (0, 5):
        url = sample_to_store(run, str(root / f"uniform-{seed}"), num_samples=7, sampler="euler", steps=1, seed=seed,
                              batch_size=4, chunk_size=4, progress=False, labels="uniform")
        _, labels = SampleStore.open(url).read_all()
        assert np.array_equal(labels, uniform_labels(7, 4, seed=seed))
    assert not np.array_equal(uniform_labels(64, 4, seed=0), uniform_labels(64, 4, seed=5))


def test_label_modes():
    assert np.array_equal(make_labels(6, 3, "uniform", 0), make_labels(6, 3, "uniform", 0))
    assert sorted(make_labels(9, 3, "balanced", 1).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="allowed"):
        make_labels(3, 3, "zipf", 0)


def test_two_ranks_split_units_and_write_the_one_process_store(trained_run):
    """torchrun with 2 gloo processes: each unit written by one rank, the store equal to a 1-process run."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, run = trained_run
    kw = dict(num_samples=10, sampler="euler", steps=2, cfg_scale=2.0, seed=5, batch_size=4, chunk_size=4,
              labels="uniform")
    one = SampleStore.open(sample_to_store(run, str(root / "one"), progress=False, **kw))
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dcae15.diffusion.sample", run, str(root / "two"), "--spec", json.dumps({**kw, "progress": True})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 3 units: rank 0 samples units 0 and 2, rank 1 unit 1
    assert "(rank 0/2): 100%|██████████| 2/2" in proc.stderr and "(rank 1/2): 100%|██████████| 1/1" in proc.stderr
    two = SampleStore.open(str(root / "two"))
    assert two.missing_units() == []
    (a, la), (b, lb) = one.read_all(), two.read_all()
    assert np.array_equal(a, b) and np.array_equal(la, lb)


@pytest.mark.numerics  # bf16 sampling against fp32, against thresholds
def test_bf16_autocast_path(trained_run):
    root, run = trained_run
    kw = dict(num_samples=4, sampler="euler", steps=2, seed=1, batch_size=4, chunk_size=4, progress=False)
    fp32, _ = SampleStore.open(sample_to_store(run, str(root / "fp32"), precision="fp32", **kw)).read_all()
    bf16, _ = SampleStore.open(sample_to_store(run, str(root / "bf16"), precision="bf16", **kw)).read_all()
    # bf16 really ran (some pixel differs) and stays close to fp32: uint8 pixels, 127.5 levels per unit of the decoded
    # [-1, 1] image; bf16 (u = 2**-8; 2 Euler steps of 4 blocks, ~40 roundings, <= 40 u = 0.16 relative) moves a pixel
    # by <= ~20 levels where the image is at +-1, and rounding errors of both signs keep the mean far lower: 8 caps it.
    # Seen: mean 0.25 (max 2; 25% of the pixels changed) under AVX-512 and default kernels
    diff = np.abs(fp32.astype(int) - bf16.astype(int))
    assert 0 < diff.mean() < 8
    with pytest.raises(ValueError, match="precision"):
        sample_to_store(run, str(root / "bad3"), precision="fp8", **kw)
