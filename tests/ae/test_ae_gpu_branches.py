"""The AE trainer's GPU branches on CPU (DCAE15_GPU_BRANCHES=1): bf16 autocast and DataLoader workers by default."""

from __future__ import annotations

import json

import pytest
import torch

from dcae15.accel import GPU_BRANCHES_ENV
from dcae15.ae.train import AETrainConfig, train_autoencoder


@pytest.mark.slow
def test_gpu_branches_train_in_bf16_with_loader_workers(shapes_dataset, tmp_path, monkeypatch):
    import torch.utils.data as tud

    made = []

    class Spy(tud.DataLoader):
        def __init__(self, *a, **kw):
            made.append(kw["num_workers"])
            super().__init__(*a, **kw)

    kw = dict(preset="tiny-f8c32", steps=2, batch_size=4, perceptual="none", log_every=1, checkpoint_every=2,
              progress=False, device="cpu")
    monkeypatch.delenv(GPU_BRANCHES_ENV, raising=False)
    train_autoencoder(AETrainConfig(**kw), shapes_dataset, str(tmp_path / "fp32"))
    monkeypatch.setenv(GPU_BRANCHES_ENV, "1")
    monkeypatch.setattr(tud, "DataLoader", Spy)
    train_autoencoder(AETrainConfig(**kw), shapes_dataset, str(tmp_path / "gpu"))
    assert made and made[0] >= 1  # num_workers None: workers where the GPU branches are taken
    loss = {r: [json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("fp32", "gpu")}
    assert all(torch.isfinite(torch.tensor(loss["gpu"])))
    assert loss["gpu"] != loss["fp32"]  # bf16 autocast ran
    for a, b in zip(loss["fp32"], loss["gpu"]):
        assert abs(a - b) <= 0.05 * abs(a)
