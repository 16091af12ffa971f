"""The autoencoder's persistence on object storage (loopback S3): save/load and a stopped-then-resumed run."""

from __future__ import annotations

import pytest
import torch

from dcae15.ae.train import AETrainConfig, train_autoencoder
from dcae15.ae.model import StructuredAutoencoder


@pytest.mark.s3
def test_ae_and_run_on_s3(s3_server, shapes_dataset):
    root = s3_server.make_bucket() + "/ae"
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32")
    ae.save_pretrained(root + "/model")
    assert StructuredAutoencoder.from_pretrained(root + "/model").fingerprint() == ae.fingerprint()

    cfg = AETrainConfig(preset="tiny-f8c32", steps=3, batch_size=4, perceptual="none", checkpoint_every=1,
                        progress=False)
    part = train_autoencoder(cfg, shapes_dataset, root + "/run", stop_at=2)
    assert not part["finished"] and part["step"] == 2
    done = train_autoencoder(cfg, shapes_dataset, root + "/run")
    assert done["finished"] and StructuredAutoencoder.from_pretrained(done["model_url"]).fingerprint() == done["fingerprint"]
