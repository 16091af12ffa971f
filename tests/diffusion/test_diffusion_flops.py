"""The analytic FLOP formula (MFU's numerator in bench/) against torch's FLOP counter on meta-device models."""

from __future__ import annotations

import pytest

from dcae15.diffusion.train import train_flops_per_image
from dcae15.models import ModelConfig, model_config
from dcae15.models.flops import forward_flops_per_image, train_flops_per_image_analytic


@pytest.mark.parametrize("arch", ["dit", "uvit"])
@pytest.mark.parametrize("shape", [(64, 2, 4, 32, 4, 1), (96, 4, 4, 128, 8, 2)])
def test_analytic_flops_equal_the_counter(arch, shape):
    d, depth, heads, c, hw, patch = shape
    mcfg = ModelConfig(arch=arch, hidden=d, depth=depth, heads=heads, in_channels=c, input_size=(hw, hw),
                       patch_size=patch, num_classes=10)
    for passes in (1, 2):
        assert train_flops_per_image_analytic(mcfg, passes) == pytest.approx(
            train_flops_per_image(mcfg, 2, passes), rel=1e-9)


def test_dit_xl_forward_is_58_gflop_on_128x8x8():
    # DESIGN's figure for sampling cost: DiT-XL, 64 tokens
    assert forward_flops_per_image(model_config("DiT-XL", in_channels=128, input_size=(8, 8))) == pytest.approx(
        58.1e9, rel=2e-3)
