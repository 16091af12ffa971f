"""Fixtures for the autoencoder tests: a tiny packed shapes dataset and a saved tiny AE."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> str:
    """16 generated 32 px images (4 classes) packed into webdataset shards; returns the dataset URL."""
    from storage.shards import pack_image_folder
    from storage.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("ae-data")
    make_shapes_dataset(str(root / "src"), num_classes=4, per_class=4, size=32, seed=0)
    pack_image_folder(str(root / "src"), str(root / "packed"), progress=False)
    return str(root / "packed")


@pytest.fixture(scope="session")
def tiny_ae_url(tmp_path_factory) -> str:
    """A randomly initialised (seeded) tiny-f8c32 saved with save_pretrained."""
    from dcae15.ae.model import StructuredAutoencoder

    torch.manual_seed(0)
    url = str(tmp_path_factory.mktemp("ae-model") / "tiny")
    StructuredAutoencoder.from_preset("tiny-f8c32").save_pretrained(url)
    return url


@pytest.fixture(scope="session")
def stand_in_vgg(tmp_path_factory) -> str:
    """A stand-in ``vgg16-397923af.pth`` (torchvision keys of the ``features`` trunk, seeded random values): the
    real LPIPS-VGG loading path without the ImageNet download. Returns the file's path."""
    from dcae15.metrics.stand_in import write_stand_in_vgg

    return str(write_stand_in_vgg(tmp_path_factory.mktemp("weights")))
