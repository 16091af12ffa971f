"""The AE trainer's GPU branches on CPU (DCAE15_GPU_BRANCHES=1): bf16 autocast and DataLoader workers by default."""

from __future__ import annotations

import json

import pytest
import torch

from dcae15.accel import GPU_BRANCHES_ENV
from dcae15.ae.train import AETrainConfig, train_autoencoder


KW = dict(preset="tiny-f8c32", steps=2, batch_size=4, perceptual="none", log_every=1, checkpoint_every=1,
          progress=False)


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fp32_losses(shapes_dataset, tmp_path_factory) -> list[float]:
    """One plain CPU process (fp32, no workers): the reference."""
    import os

    if os.environ.get(GPU_BRANCHES_ENV):
        pytest.skip(f"{GPU_BRANCHES_ENV} is set for the whole session")
    run = tmp_path_factory.mktemp("ae-fp32") / "run"
    train_autoencoder(AETrainConfig(**KW), shapes_dataset, str(run))
    return _losses(run)


@pytest.mark.slow
def test_gpu_branches_train_in_bf16_with_loader_workers(shapes_dataset, fp32_losses, tmp_path, monkeypatch):
    import torch.utils.data as tud

    made = []

    class Spy(tud.DataLoader):
        def __init__(self, *a, **kw):
            made.append(kw["num_workers"])
            super().__init__(*a, **kw)

    monkeypatch.setenv(GPU_BRANCHES_ENV, "1")
    monkeypatch.setattr(tud, "DataLoader", Spy)
    train_autoencoder(AETrainConfig(**KW, device="cpu"), shapes_dataset, str(tmp_path / "gpu"))
    assert made and made[0] >= 1  # num_workers None: workers where the GPU branches are taken
    loss = _losses(tmp_path / "gpu")
    assert all(torch.isfinite(torch.tensor(loss)))
    assert loss != fp32_losses  # bf16 autocast ran
    assert all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(fp32_losses, loss))


@pytest.mark.slow
def test_two_gloo_ranks_take_the_gpu_branches(shapes_dataset, fp32_losses, tmp_path):
    """torchrun, 2 ranks, DCAE15_GPU_BRANCHES=1: DDP under bf16 autocast, default loader workers, the checkpoint
    waits on the gloo I/O group; the losses stay close to one fp32 process's."""
    import os
    import subprocess

    import yaml

    from flows.launch import torchrun_command

    conf = tmp_path / "launch.yaml"
    conf.write_text(yaml.safe_dump({"dataset_url": shapes_dataset, "run_url": str(tmp_path / "two"), "train": KW}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", GPU_BRANCHES_ENV: "1"}
    out = subprocess.run(torchrun_command("dcae15.ae.train", ["--config", str(conf)], nproc_per_node=2), env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done = json.loads((tmp_path / "two" / "done.json").read_text())
    assert done["world_size"] == 2 and done["finished"]
    two = _losses(tmp_path / "two")
    assert two != fp32_losses and all(abs(a - b) <= 0.05 * abs(a) for a, b in zip(fp32_losses, two))
