"""The AE trainer under torchrun (DDP, gloo on CPU): 2 ranks x B/2 images == 1 process x B within fp tolerance,
a stop + resume at the same world size is exact, a 2-rank checkpoint resumed by 1 process continues the same run,
DataLoader workers decode the rank's own images."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dcae15.ae.train import AETrainConfig, train_autoencoder
from dcae15.ae.model import StructuredAutoencoder

pytestmark = pytest.mark.slow

# GAN (a DDP discriminator), per-sample c' drawn for the global batch, LPIPS, EMA, flips: every rank-sliced part
_CFG = dict(preset="tiny-f8c32", steps=4, batch_size=8, lr=1e-3, perceptual="lpips-squeeze", lpips_random_backbone=True,
            w_gan=0.1, gan_start_step=1, disc_channels=8, disc_layers=2, ema_decay=0.9, channel_mode="per_sample",
            channels_per_step=2, include_full=True, checkpoint_every=2, log_every=1, progress=False)


def _torchrun(tmp: Path, ds: str, run: str, stop_at: int | None = None, **over) -> None:
    from flows.launch import torchrun_command

    f = tmp / f"launch-{abs(hash((run, stop_at)))}.yaml"
    f.write_text(yaml.safe_dump({"dataset_url": ds, "run_url": run, "train": {**_CFG, **over}}))
    args = ["--config", str(f)] + (["--stop-at", str(stop_at)] if stop_at else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(torchrun_command("dcae15.ae.train", args, nproc_per_node=2), env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return StructuredAutoencoder.from_pretrained(str(run / "model")).state_dict()


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "sec"} for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_equal_one_process_and_resume_exactly(shapes_dataset, tmp_path):
    one = train_autoencoder(AETrainConfig(**_CFG), shapes_dataset, str(tmp_path / "one"))
    # DataLoader workers (fork: no threads in a torchrun child) on the 2-rank runs; operational, same run identity
    _torchrun(tmp_path, shapes_dataset, str(tmp_path / "two"), num_workers=1, loader_context="fork")
    _torchrun(tmp_path, shapes_dataset, str(tmp_path / "resumed"), stop_at=2)
    assert json.loads((tmp_path / "resumed" / "latest").read_text()) == {"step": 2, "checkpoint": "checkpoints/step-0000002.pt"}
    assert not (tmp_path / "resumed" / "done.json").exists()
    import shutil

    shutil.copytree(tmp_path / "resumed", tmp_path / "cross")  # the same checkpoint, resumed by 1 process below
    _torchrun(tmp_path, shapes_dataset, str(tmp_path / "resumed"))
    train_autoencoder(AETrainConfig(**_CFG), shapes_dataset, str(tmp_path / "cross"))

    two = json.loads((tmp_path / "two" / "done.json").read_text())
    assert two["world_size"] == 2 and two["config_fingerprint"] == one["config_fingerprint"]
    w1, w2, wr = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(tmp_path / "resumed")
    wx = _weights(tmp_path / "cross")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)
        assert torch.equal(wr[k], w2[k]), k  # same world size: stop + resume is bit-exact
        torch.testing.assert_close(wx[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)  # another world size: same run
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in m2] == [1, 2, 3, 4] and m2[-1]["gan_d"] > 0
    for a, b in zip(m1, m2):  # the logged losses are the mean over ranks: the one-process numbers
        for k in ("loss", "l1", "lpips", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (k, a, b)
    assert _metrics(tmp_path / "resumed") == m2
