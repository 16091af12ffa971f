"""Backbones: paper parameter counts on the meta device, shapes, and ADT masking == official slicing."""

from __future__ import annotations

import pytest
import torch

from dcae15.ae.model import channel_mask
from dcae15.diffusion.adt import ADTConfig, diffusion_loss, masked_mse
from dcae15.models import PRESETS, build_model, model_config

# (preset, latent shape (C, H, W), patch, published params in M, where the figure comes from)
PAPER = [
    ("DiT-XL", (4, 32, 32), 2, 675.0, "DiT-XL/2 on SD-VAE f8c4 256px (DiT paper, with learned sigma)"),
    ("UViT-H", (4, 32, 32), 2, 501.0, "U-ViT-H/2 on SD-VAE f8c4 256px (U-ViT paper)"),
    ("UViT-H", (32, 8, 8), 1, 501.0, "UViT-H/1 on DC-AE f32c32 256px (DC-AE 1.5 Table 3: 0.50B)"),
    ("USiT-2B", (32, 8, 8), 1, 1580.0, "USiT-2B/1 on DC-AE f32c32 256px (DC-AE 1.5 Table 3: 1.58B)"),
    ("UViT-2B", (128, 16, 16), 1, 1580.0, "UViT-2B/1 on DC-AE f32c128 512px"),
    ("USiT-3B", (128, 8, 8), 1, 3110.0, "USiT-3B/1 on DC-AE-1.5 f64c128 512px (DC-AE 1.5 Table 3: 3.11B)"),
]


@pytest.mark.parametrize("name,shape,patch,paper,where", PAPER)
def test_big_preset_param_counts_match_papers(name, shape, patch, paper, where):
    with torch.device("meta"):
        m = build_model(model_config(name, in_channels=shape[0], input_size=shape[1:], patch_size=patch))
    n = sum(p.numel() for p in m.parameters()) / 1e6
    print(f"{name} on latent {shape} patch {patch}: {n:.2f}M params (published {paper:.0f}M: {where})")
    assert abs(n - paper) / paper < 0.005


def test_sit_and_usit_share_networks_with_dit_and_uvit():
    assert PRESETS["SiT-XL"].arch == PRESETS["DiT-XL"].arch and PRESETS["SiT-XL"].objective == "flow"
    assert (PRESETS["USiT-H"].arch, PRESETS["USiT-H"].hidden) == (PRESETS["UViT-H"].arch, PRESETS["UViT-H"].hidden)
    assert PRESETS["DiT-XL"].objective == "ddpm-linear" and PRESETS["UViT-H"].objective == "ddpm-scaled-linear"


def test_bad_configs_fail_with_the_field_name():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("DiT-XXL", in_channels=4, input_size=(8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        model_config("DiT-tiny", in_channels=4, input_size=(5, 5), patch_size=2)
    with pytest.raises(ValueError, match="unknown fields ModelConfig.width"):
        model_config("DiT-tiny", in_channels=4, input_size=(8, 8), width=3)


def _tiny(name, c=32, hw=4, patch=1, seed=0):
    torch.manual_seed(seed)
    m = build_model(model_config(name, in_channels=c, input_size=(hw, hw), patch_size=patch, num_classes=10))
    # DiT's adaLN-Zero init makes the output identically 0; randomise so the comparison means something.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


@pytest.mark.parametrize("name,patch", [("DiT-tiny", 1), ("DiT-tiny", 2), ("UViT-tiny", 1), ("UViT-tiny", 2)])
def test_forward_shapes_and_null_class(name, patch):
    m = _tiny(name, patch=patch, hw=8)
    x = torch.randn(3, 32, 8, 8)
    out = m(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 9, 10]))  # 10 = null class
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name,patch", [("DiT-tiny", 1), ("DiT-tiny", 2), ("UViT-tiny", 1), ("UViT-tiny", 2)])
def test_adt_masking_equals_official_slicing(name, patch):
    """Eq. 2 with a mask == official code: input embedding sliced to c' channels, output rows sliced."""
    m = _tiny(name, patch=patch, hw=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 8, 8, generator=g)
    t = torch.tensor([1.0, 200.0, 600.0, 999.0])
    y = torch.tensor([1, 2, 3, 10])
    target = torch.randn(4, 32, 8, 8, generator=g)
    for cp in (8, 20, 32):
        mask = channel_mask(torch.full((4,), cp), 32)
        masked_pred = m(x * mask, t, y) * mask
        sliced_pred = m(x[:, :cp], t, y, channels=cp)
        torch.testing.assert_close(masked_pred[:, :cp], sliced_pred, rtol=1e-5, atol=1e-5)
        assert not masked_pred[:, cp:].any()
        # The losses (averaged over active elements) agree too, and so do their gradients.
        m.zero_grad()
        masked_mse(m(x * mask, t, y), target, mask).backward()
        g_mask = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        torch.nn.functional.mse_loss(m(x[:, :cp], t, y, channels=cp), target[:, :cp]).backward()
        for a, b in zip(g_mask, [p.grad for p in m.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adt_per_sample_and_full_objective():
    m = _tiny("DiT-tiny")
    x = torch.randn(6, 32, 4, 4)
    t, y, tgt = torch.full((6,), 300.0), torch.arange(6), torch.randn(6, 32, 4, 4)
    chans = [8, 16, 24, 32]
    # per_sample: each sample's loss part equals its own sliced loss, weighted by active elements.
    adt = ADTConfig(mode="per_sample")
    gen = torch.Generator().manual_seed(3)
    loss, _ = diffusion_loss(m, x, t, y, tgt, adt, chans, gen)
    from dcae15.diffusion.adt import sample_channels

    cps = sample_channels(chans, 6, "per_sample", torch.Generator().manual_seed(3))
    assert len(set(cps.tolist())) > 1
    sums, count = 0.0, 0
    for i, cp in enumerate(cps.tolist()):
        pred = m(x[i:i + 1, :cp], t[i:i + 1], y[i:i + 1], channels=cp)
        sums += (pred - tgt[i:i + 1, :cp]).square().sum()
        count += pred.numel()
    torch.testing.assert_close(loss, sums / count, rtol=1e-5, atol=1e-6)
    # include_full: 1/2 (L_full + L_c').
    adt = ADTConfig(mode="per_batch", include_full=True)
    loss, _ = diffusion_loss(m, x, t, y, tgt, adt, chans, torch.Generator().manual_seed(5))
    cp = int(sample_channels(chans, 6, "per_batch", torch.Generator().manual_seed(5))[0])
    full = torch.nn.functional.mse_loss(m(x, t, y), tgt)
    part = torch.nn.functional.mse_loss(m(x[:, :cp], t, y, channels=cp), tgt[:, :cp])
    torch.testing.assert_close(loss, 0.5 * (full + part), rtol=1e-5, atol=1e-6)
    # off switch: the plain loss on all channels.
    loss, _ = diffusion_loss(m, x, t, y, tgt, ADTConfig(enabled=False), chans, gen)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(m(x, t, y), tgt))


def test_adt_config_checks():
    from dcae15.diffusion.adt import default_channel_list

    assert default_channel_list(128) == list(range(16, 129, 4))
    assert default_channel_list(30) == [16, 20, 24, 28, 30]
    assert ADTConfig().resolve(32, [8, 12, 32]) == [8, 12, 32]
    with pytest.raises(ValueError, match="mode"):
        ADTConfig(mode="per_token")
    with pytest.raises(ValueError, match="above the store"):
        ADTConfig(channels=[16, 64]).resolve(32)
