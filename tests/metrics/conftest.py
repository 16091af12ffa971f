"""Fixtures for the metrics tests: a small shapes dataset, its proxy classifier, stand-in Inception weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# The root tests/conftest.py blocks every non-loopback connect(); these tests also make torch.hub's downloader
# fail loudly (see `no_download` in tests/conftest.py), so a weights download attempt cannot pass silently.


@pytest.fixture(scope="session")
def shapes_url(tmp_path_factory):
    from storage.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("metrics") / "shapes"
    return make_shapes_dataset(str(root), num_classes=8, per_class=200, size=32, seed=0)


@pytest.fixture(scope="session")
def shapes_images(shapes_url):
    from dcae15.metrics.inputs import load_labelled_images

    return load_labelled_images(shapes_url, resolution=None)


@pytest.fixture(scope="session")
def proxy_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("proxy-cache"))


@pytest.fixture(scope="session")
def proxy_spec(shapes_url, proxy_cache):
    from dcae15.metrics.proxy import ProxyConfig, proxy_extractor

    return proxy_extractor(shapes_url, ProxyConfig(), cache_url=proxy_cache)


@pytest.fixture(scope="session")
def stand_in_inception(tmp_path_factory):
    """A folder holding ``weights-inception-2015-12-05-6726825d.pth`` with the real keys and random values.

    Built from torch-fidelity's own Inception class (random init, seed 0; ``dcae15.metrics.stand_in``) so the real loading path is exercised;
    its numbers are meaningless, its plumbing is real.
    """
    from dcae15.metrics.stand_in import write_stand_in_inception

    return write_stand_in_inception(tmp_path_factory.mktemp("weights")).parent


@pytest.fixture(scope="session")
def shift():
    """A function making a visibly different image set: shapes cut into 8 px tiles and shuffled, then a brightness
    shift + noise (deterministic). The tiles matter: the proxy is trained to ignore noise and blur, not shape."""

    def shifted(images: np.ndarray, amount: int = 60) -> np.ndarray:
        rng = np.random.default_rng(1)
        n, h, w, c = images.shape
        t = 8
        tiles = images.reshape(n, h // t, t, w // t, t, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, t, t, c)
        tiles = tiles[:, rng.permutation(tiles.shape[1])]
        scrambled = tiles.reshape(n, h // t, w // t, t, t, c).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
        out = scrambled.astype(np.int16) + amount + rng.integers(-30, 30, images.shape)
        return np.clip(out, 0, 255).astype(np.uint8)

    return shifted
