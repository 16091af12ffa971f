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


# Masked (width-32 GEMMs fed exact zeros) and sliced (width-c' GEMMs) are the same sums in another blocking. The claim
# is about math, so the network runs in float64 (u = 1.1e-16): <= 4 blocks of GEMMs of length <= 4 * 96 = 384 give a
# bound ~ 384 * 8 * u ~ 3e-13 relative to the outputs (|out| <= 1.3); 1e-12 is above it (seen <= 8.5e-16 relative).
_F64_OUT_TOL = 1e-12
# masked_mse squares and sums in fp32 by design (pred.float()), so its gradient seed 2 (pred - target) / N carries
# fp32 rounding of the float64 predictions, ~2u32 = 1.2e-7 relative; a gradient element sums <= 4 * 64 such terms of
# either sign, so the bound is ~2u32 x a cancellation factor <= 8 ~ 1e-6 of the tensor's largest element (seen <= 6.2e-8
# under ATEN_CPU_CAPABILITY=default and avx512); float64 backprop adds ~1e-16.
_GRAD_REL_TO_MAX = 1e-6


@pytest.mark.numerics  # different GEMM widths: different reductions
@pytest.mark.parametrize("name,patch", [("DiT-tiny", 1), ("DiT-tiny", 2), ("UViT-tiny", 1), ("UViT-tiny", 2)])
def test_adt_masking_equals_official_slicing(name, patch):
    """Eq. 2 with a mask == official code: input embedding sliced to c' channels, output rows sliced."""
    m = _tiny(name, patch=patch, hw=8).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 200.0, 600.0, 999.0], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 10])
    target = torch.randn(4, 32, 8, 8, generator=g, dtype=torch.float64)
    for cp in (8, 20, 32):
        mask = channel_mask(torch.full((4,), cp), 32, dtype=torch.float64)
        masked_pred = m(x * mask, t, y) * mask
        sliced_pred = m(x[:, :cp], t, y, channels=cp)
        assert sliced_pred.dtype == torch.float64
        torch.testing.assert_close(masked_pred[:, :cp], sliced_pred, rtol=_F64_OUT_TOL, atol=_F64_OUT_TOL)
        assert not masked_pred[:, cp:].any()
        # The losses (averaged over active elements) agree too, and so do their gradients.
        m.zero_grad()
        masked_mse(m(x * mask, t, y), target, mask).backward()
        g_mask = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        torch.nn.functional.mse_loss(m(x[:, :cp], t, y, channels=cp), target[:, :cp]).backward()
        for a, b in zip(g_mask, [p.grad for p in m.parameters()]):
            torch.testing.assert_close(a, b, rtol=0, atol=_GRAD_REL_TO_MAX * b.abs().max().item())


# The network runs in float64 (batch of 6 vs batches of 1 then agree to ~1e-15); the loss code squares and sums in fp32
# by design: <= 3u32 per square plus torch's cascade sum of <= 2 * 6 * 32 * 16 positive terms, ~log2(6144) u32 = 13u32,
# ~1e-6 relative. rtol 1e-5 is ~10x that (seen <= 2e-8 under ATEN_CPU_CAPABILITY=default and avx512).
_LOSS_RTOL = 1e-5


@pytest.mark.numerics  # batch of 6 vs batches of 1: different GEMM shapes and reductions
def test_adt_per_sample_and_full_objective():
    m = _tiny("DiT-tiny").double()
    x = torch.randn(6, 32, 4, 4, dtype=torch.float64)
    t, y = torch.full((6,), 300.0, dtype=torch.float64), torch.arange(6)
    tgt = torch.randn(6, 32, 4, 4, dtype=torch.float64)
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
    torch.testing.assert_close(loss.double(), sums / count, rtol=_LOSS_RTOL, atol=0)
    # include_full: 1/2 (L_full + L_c').
    adt = ADTConfig(mode="per_batch", include_full=True)
    loss, _ = diffusion_loss(m, x, t, y, tgt, adt, chans, torch.Generator().manual_seed(5))
    cp = int(sample_channels(chans, 6, "per_batch", torch.Generator().manual_seed(5))[0])
    full = torch.nn.functional.mse_loss(m(x, t, y), tgt)
    part = torch.nn.functional.mse_loss(m(x[:, :cp], t, y, channels=cp), tgt[:, :cp])
    torch.testing.assert_close(loss.double(), 0.5 * (full + part), rtol=_LOSS_RTOL, atol=0)
    # off switch: the plain loss on all channels.
    loss, _ = diffusion_loss(m, x, t, y, tgt, ADTConfig(enabled=False), chans, gen)
    full = torch.nn.functional.mse_loss(m(x, t, y), tgt)
    torch.testing.assert_close(loss.double(), full, rtol=_LOSS_RTOL, atol=0)


def test_adt_config_checks():
    from dcae15.diffusion.adt import default_channel_list

    assert default_channel_list(128) == list(range(16, 129, 4))
    assert default_channel_list(30) == [16, 20, 24, 28, 30]
    assert ADTConfig().resolve(32, [8, 12, 32]) == [8, 12, 32]
    with pytest.raises(ValueError, match="mode"):
        ADTConfig(mode="per_token")
    with pytest.raises(ValueError, match="above the store"):
        ADTConfig(channels=[16, 64]).resolve(32)
