"""PSNR / SSIM against scikit-image, and LPIPS that loads backbones offline and never downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcae15.metrics.image_quality import LPIPSMetric, psnr, ssim
from dcae15.metrics.lpips_offline import BACKBONE_FILES, build_lpips
from dcae15.pixels import to_uint8_nhwc
from dcae15.weights import MissingWeightsError


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 40, 48, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


def test_psnr_ssim_match_skimage(pair):
    metrics = pytest.importorskip("skimage.metrics")
    x, y = pair
    a, b = to_uint8_nhwc(x), to_uint8_nhwc(y)
    want_p = [metrics.peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(3)]
    want_s = [metrics.structural_similarity(a[i], b[i], channel_axis=2, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=255) for i in range(3)]
    np.testing.assert_allclose(psnr(x, y).numpy(), want_p, rtol=1e-5)
    np.testing.assert_allclose(ssim(x, y).numpy(), want_s, rtol=1e-5)


def test_identical_images_are_perfect(pair):
    x, _ = pair
    assert torch.all(psnr(x, x) == 100.0)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:, :, :8])


def test_lpips_missing_backbone_names_the_file(no_download, monkeypatch, tmp_path):
    monkeypatch.setenv("DCAE15_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        build_lpips("vgg")
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        LPIPSMetric("alex")
    with pytest.raises(ValueError, match="allowed"):
        build_lpips("resnet")


def test_lpips_loads_a_local_torchvision_file_without_downloading(no_download, monkeypatch, tmp_path, pair):
    """A stand-in squeezenet file (right keys, seeded weights) goes through the real loading path."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.squeezenet1_1().state_dict()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / BACKBONE_FILES["squeeze"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DCAE15_WEIGHTS", raising=False)
    model = build_lpips("squeeze")
    torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(model.net.state_dict()["slice7.12.expand3x3.bias"], state["features.12.expand3x3.bias"])
    assert not any(p.requires_grad for p in model.parameters())
    x, y = pair
    metric = LPIPSMetric("squeeze")
    d = metric(x, y)
    assert d.shape == (3,) and torch.all(d > 0) and torch.all(metric(x, x) < 1e-6)


def test_lpips_random_backbone_for_tests_only(no_download):
    model = build_lpips("alex", random_backbone=True)
    x = torch.zeros(1, 3, 32, 32)
    assert model(x, x).item() == pytest.approx(0.0, abs=1e-6)
