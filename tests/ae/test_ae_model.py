"""StructuredAutoencoder: presets, Eq. 1 masking, diffusers interoperability, save/load, fingerprints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dcae15.ae.model import AE_PRESETS, AEConfig, MissingWeightsError, StructuredAutoencoder, default_channel_choices

# (preset, image size) for the meta-device shape checks of the full-size presets
BIG = [("dc-ae-f32c32-in-1.0", 256), ("dc-ae-f32c128-1.5", 256), ("dc-ae-f64c128-1.5", 512)]


@pytest.mark.parametrize("name,size", BIG)
def test_big_presets_shapes_on_meta(name, size):
    cfg = AE_PRESETS[name]
    with torch.device("meta"):
        ae = StructuredAutoencoder(cfg)
        z = ae.encode(torch.empty(2, 3, size, size))
        y = ae.decode(z)
    f = int(name.split("-f")[1].split("c")[0])
    c = int(name.split("c")[-1].split("-")[0])
    assert ae.spatial_compression == f and ae.latent_channels == c
    assert tuple(z.shape) == (2, c, size // f, size // f)
    assert tuple(y.shape) == (2, 3, size, size)


def test_preset_structure_matches_the_papers():
    in10, f32, f64 = (AE_PRESETS[n] for n in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c128-1.5", "dc-ae-f64c128-1.5"))
    assert in10.bottleneck_shortcut and not in10.structured and in10.scaling_factor == pytest.approx(0.3189)
    assert in10.encoder_block_types == ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    assert in10.decoder_layers_per_block == (0, 5, 10, 2, 2, 2)
    for cfg in (f32, f64):
        assert not cfg.bottleneck_shortcut and set(cfg.encoder_block_types) == {"ResBlock"}
        assert cfg.channel_choices == tuple(range(16, 129, 4))
    assert f64.block_out_channels == (128, 256, 512, 512, 1024, 1024, 1024)
    assert f64.scaling_factor == pytest.approx(0.5935)


@pytest.mark.parametrize("name,size", [("tiny-f4c8", 32), ("tiny-f8c32", 32), ("tiny-f16c64", 64)])
def test_tiny_presets_run(name, size):
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset(name)
    x = torch.rand(2, 3, size, size) * 2 - 1
    z = ae.encode(x)
    f, c = ae.spatial_compression, ae.latent_channels
    assert tuple(z.shape) == (2, c, size // f, size // f)
    assert ae.decode(z, channels=ae.channel_choices[0]).shape == x.shape
    assert ae.channel_choices[-1] == c


def test_default_channel_choices():
    assert default_channel_choices(128) == tuple(range(16, 129, 4))
    assert default_channel_choices(32) == (8, 12, 16, 20, 24, 28, 32)
    assert default_channel_choices(64)[0] == 16 and default_channel_choices(64)[-1] == 64


def test_config_rejects_structured_with_bottleneck_shortcut():
    with pytest.raises(ValueError, match="bottleneck_shortcut"):
        dataclasses.replace(AE_PRESETS["tiny-f8c32"], bottleneck_shortcut=True)
    with pytest.raises(ValueError, match="decoder_norm_types"):
        dataclasses.replace(AE_PRESETS["tiny-f8c32"], decoder_norm_types=("layer_norm",) * 4)
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        StructuredAutoencoder.from_preset("dc-ae-f99")


# Masked vs sliced input conv (reduction over 32 * 9 vs c' * 9 taps) and a batch of 3 vs a batch of 1 are the same sums
# in another blocking: a claim about math, so the decoder runs in float64 (u = 1.1e-16). ~10 convs of length
# <= 9 * 64 = 576 bound the rounding at ~576 * 10 * u ~ 6e-13 relative to the images (|x| <= 1.6); 1e-11 is above it
# (seen: 0 in float64, 7e-7 in fp32 for the batch of 1, under ATEN_CPU_CAPABILITY=default and avx512).
_F64_TOL = 1e-11


@pytest.mark.numerics  # sliced vs masked conv, batch of 3 vs 1: different reductions
def test_eq1_masking_equals_sliced_input_conv():
    """Zeroing channels >= c' (Eq. 1) == the official implementation: slice the decoder's input conv, keep its bias."""
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32").eval().double()
    z = torch.randn(3, 32, 4, 4, dtype=torch.float64)
    conv = ae.net.decoder.conv_in
    assert conv.bias is not None and conv.bias.abs().sum() > 0  # the bias is what makes "keep it" meaningful
    for c in (8, 20, 32):
        masked = conv(z * (torch.arange(32) < c).double()[None, :, None, None])
        sliced = F.conv2d(z[:, :c], conv.weight[:, :c], conv.bias, padding=1)
        torch.testing.assert_close(masked, sliced, rtol=_F64_TOL, atol=_F64_TOL)
        with torch.no_grad():
            out = ae.decode_truncated(z[:, :c])
            assert out.dtype == torch.float64
            torch.testing.assert_close(ae.decode(z, channels=c), out, rtol=_F64_TOL, atol=_F64_TOL)
    # channels beyond c' really are ignored (the masked inputs are the same bits: exact), and per-sample c' picks each
    # sample's own prefix
    with torch.no_grad():
        z2 = z.clone()
        z2[:, 12:] = torch.randn_like(z2[:, 12:])
        torch.testing.assert_close(ae.decode(z, channels=12), ae.decode(z2, channels=12), rtol=0, atol=0)
        per = ae.decode(z, channels=torch.tensor([8, 20, 32]))
        torch.testing.assert_close(per[1], ae.decode(z[1:2], channels=20)[0], rtol=_F64_TOL, atol=_F64_TOL)
        assert not torch.allclose(ae.decode(z, channels=8), ae.decode(z, channels=32))


def test_diffusers_checkpoint_loads_with_identical_outputs(tmp_path):
    from diffusers import AutoencoderDC

    torch.manual_seed(1)
    ref = AutoencoderDC(**AE_PRESETS["tiny-f16c64"].diffusers_kwargs()).eval()
    ref.save_pretrained(tmp_path / "official")
    ours = StructuredAutoencoder.from_pretrained(str(tmp_path / "official"))
    assert ours.config.name == "official" and ours.channel_choices == default_channel_choices(64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x).latent, rtol=0, atol=0)
        torch.testing.assert_close(ours.decode(ours.encode(x)), ref(x).sample, rtol=0, atol=0)
    # and the other way round: our directory is a diffusers checkpoint
    ours.save_pretrained(str(tmp_path / "ours"))
    back = AutoencoderDC.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).sample, ref(x).sample, rtol=0, atol=0)


def test_unstructured_official_config_roundtrip_keeps_shortcuts(tmp_path):
    from diffusers import AutoencoderDC

    small = dataclasses.replace(AE_PRESETS["dc-ae-f32c32-in-1.0"], block_out_channels=(8, 16, 32, 32, 64, 64),
                                encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
                                attention_head_dim=8)
    torch.manual_seed(0)
    AutoencoderDC(**small.diffusers_kwargs()).save_pretrained(tmp_path / "in10")
    ae = StructuredAutoencoder.from_pretrained(str(tmp_path / "in10"))
    assert ae.config.bottleneck_shortcut and not ae.channel_choices
    assert ae.config.decoder_norm_types == small.decoder_norm_types
    with pytest.raises(ValueError, match="bottleneck shortcuts"):
        ae.decode(torch.zeros(1, 32, 1, 1), channels=8)


def test_save_load_memory_url_and_fingerprint():
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32")
    ae.save_pretrained("memory://ae-tests/tiny")
    back = StructuredAutoencoder.from_pretrained("memory://ae-tests/tiny")
    assert back.config == ae.config
    assert back.fingerprint() == ae.fingerprint()
    with torch.no_grad():
        back.net.decoder.conv_out.conv.bias.add_(1e-3)
    assert back.fingerprint() != ae.fingerprint()
    renamed = StructuredAutoencoder(dataclasses.replace(ae.config, name="other"))
    renamed.load_state_dict(ae.state_dict())
    assert renamed.fingerprint() == ae.fingerprint()  # the name is a label, not the architecture


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="config.json"):
        StructuredAutoencoder.from_pretrained(str(tmp_path / "nothing"))
    StructuredAutoencoder.from_preset("tiny-f8c32").save_pretrained(str(tmp_path / "ae"))
    (tmp_path / "ae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors"):
        StructuredAutoencoder.from_pretrained(str(tmp_path / "ae"))


def test_bad_inputs_are_refused():
    ae = StructuredAutoencoder.from_preset("tiny-f8c32")
    with pytest.raises(ValueError, match="multiples of 8"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="channels=40"):
        ae.decode(torch.zeros(1, 32, 4, 4), channels=40)
    with pytest.raises(ValueError, match="unknown fields"):
        AEConfig.from_dict({**AE_PRESETS["tiny-f8c32"].to_dict(), "bogus": 1})
