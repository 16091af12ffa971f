"""Fixtures for the diffusion tests: a small random latent store written through storage's API."""

from __future__ import annotations

import numpy as np
import pytest

from storage.latent_store import LatentStore


def make_latent_store(url: str, *, n: int = 128, c: int = 32, hw: int = 4, num_classes: int = 4, unit: int = 32,
                      flip: bool = True, seed: int = 0, attrs: dict | None = None) -> str:
    """A finalized store of class-dependent random latents (class k shifts channel means by k/2)."""
    rng = np.random.default_rng(seed)
    st = LatentStore.create(url, num_samples=n, channels=c, height=hw, width=hw, flip=flip, chunk_size=unit,
                            attrs={"ae_fingerprint": "ae-test", "dataset_fingerprint": f"ds-{seed}",
                                   "resolution": hw * 8, "ae_scaling_factor": 1.0, "num_classes": num_classes,
                                   **(attrs or {})})
    for u in range(st.num_units):
        a, b = st.unit_bounds(u)
        labels = rng.integers(0, num_classes, b - a)
        base = rng.standard_normal((b - a, c, hw, hw)).astype(np.float32) * 0.5
        lat = base + labels[:, None, None, None] * 0.5 - 0.75
        st.write_unit(u, lat, labels, np.ones(b - a, bool), lat[..., ::-1] if flip else None)
    st.finalize()
    return url


@pytest.fixture(scope="session")
def latent_store(tmp_path_factory) -> str:
    return make_latent_store(str(tmp_path_factory.mktemp("latents") / "store"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads ran tiny-model steps ~10x slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def make_store():
    """The store factory itself (test modules cannot import conftest under --import-mode=importlib)."""
    return make_latent_store


def make_decodable_store(root, *, n: int = 64) -> str:
    """A store of random latents made for a real tiny-f8c32 AE (saved, so samples decode) under ``root``; returns
    the store's URL."""
    import torch

    from dcae15.ae.model import StructuredAutoencoder

    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32")
    ae_url = ae.save_pretrained(str(root / "ae"))
    return make_latent_store(str(root / "store"), n=n, c=32, hw=4,
                             attrs={"ae_fingerprint": ae.fingerprint(), "ae_url": ae_url})


def train_tiny_run(root, *, model: str = "USiT-tiny", n: int = 64, global_batch_size: int = 16, steps: int = 2,
                   **train) -> str:
    """A tiny diffusion run on ``make_decodable_store(root)``; returns the run URL."""
    from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion

    store = make_decodable_store(root, n=n)
    cfg = DiffusionTrainConfig(model=model, global_batch_size=global_batch_size, steps=steps, progress=False, **train)
    return train_diffusion(cfg, store, str(root / "run"))["run_url"]


@pytest.fixture(scope="session")
def decodable_store_factory():
    """``make_decodable_store`` itself (test modules cannot import conftest under --import-mode=importlib)."""
    return make_decodable_store


@pytest.fixture(scope="session")
def tiny_run_factory():
    """``train_tiny_run`` itself (test modules cannot import conftest under --import-mode=importlib)."""
    return train_tiny_run
