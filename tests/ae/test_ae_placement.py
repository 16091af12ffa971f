"""The placement rule in the autoencoder's entry points: the encoder for encoding lands on the target device, and
the AE trainer runs the placement guard over everything it set up (see tests/diffusion/test_diffusion_placement.py
for why a CPU test needs a target device other than the host)."""

from __future__ import annotations

import torch

from dcae15.ae.train import AETrainConfig, train_autoencoder
from dcae15.parallel import misplaced

META = torch.device("meta")


def test_encoder_loads_onto_the_device(tiny_ae_url):
    from dcae15.ae.encode import load_encoder

    encoder, _ = load_encoder(tiny_ae_url, META)
    assert misplaced(META, encoder=encoder) == []
    load_encoder(tiny_ae_url, torch.device("cpu"))  # the per-process cache keeps one AE: leave a usable one


def test_ae_trainer_runs_the_guard_over_its_set_up(shapes_dataset, tmp_path, monkeypatch):
    import dcae15.ae.train as ae_train

    seen = []
    real = ae_train.check_placement

    def spy(device, **things):
        seen.append((str(device), sorted(k for k, v in things.items() if v is not None)))
        real(device, **things)

    monkeypatch.setattr(ae_train, "check_placement", spy)
    cfg = AETrainConfig(preset="tiny-f8c32", steps=1, batch_size=2, perceptual="none", w_gan=0.1, progress=False)
    train_autoencoder(cfg, shapes_dataset, str(tmp_path / "run"))
    assert seen == [("cpu", ["disc", "disc_optimizer", "ema", "model", "optimizer"])]
