"""Official DC-AE checkpoints: efficientvit / DC-Gen layout <-> ours (diffusers' AutoencoderDC layout), bit for bit;
DC-Gen's 1.5 definitions as presets; clear errors for missing / truncated / other-architecture checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from dcae15.ae.convert import (efficientvit_key_map, from_efficientvit, to_diffusers_state, to_efficientvit_state)
from dcae15.ae.model import AE_PRESETS, AEConfig, StructuredAutoencoder

# tiny architectures with every block kind the releases use: 1.0 (ResBlock + EfficientViT with a 5x5 multi-scale
# branch, BatchNorm+ReLU decoder stages, latent shortcuts) and 1.5 (all ResBlock, no shortcuts, SiLU out, adaptive io)
TINY_10 = AEConfig(name="tiny-1.0", latent_channels=8, block_out_channels=(16, 32, 32), attention_head_dim=8,
                   encoder_layers_per_block=(0, 1, 1), decoder_layers_per_block=(0, 1, 2),
                   encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                   decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                   decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"), decoder_act_fns=("relu", "relu", "silu"),
                   encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                   bottleneck_shortcut=True)
TINY_15 = AEConfig(name="tiny-1.5", latent_channels=8, block_out_channels=(16, 32, 32),
                   encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 2, 1),
                   encoder_block_types=("ResBlock",) * 3, decoder_block_types=("ResBlock",) * 3,
                   decoder_norm_types=("rms_norm",) * 3, decoder_act_fns=("silu",) * 3, decoder_conv_act_fn="silu",
                   adaptive_io=True, channel_choices=(4, 8))


def _random_state(cfg: AEConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = StructuredAutoencoder(cfg)
    gen = torch.Generator().manual_seed(1)
    out = {k: (torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v.clone())
           for k, v in model.net.state_dict().items()}
    return {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in out.items()}  # a variance is > 0


def test_dc_gen_1_5_presets():
    """The presets follow DC-Gen's dc_ae_f32_1_5 / dc_ae_f64_1_5 (dc_ai/aecore/models/dc_ae.py)."""
    for name, widths in (("dc-ae-f32c128-1.5", (128, 256, 512, 512, 1024, 1024)),
                         ("dc-ae-f64c128-1.5", (128, 256, 512, 512, 1024, 1024, 1024))):
        cfg = AE_PRESETS[name]
        assert cfg.block_out_channels == widths and cfg.encoder_layers_per_block == (0, 5, 10, 4, 4, 4, 4)[:len(widths)]
        assert cfg.decoder_conv_act_fn == "silu" and cfg.adaptive_io and not cfg.bottleneck_shortcut
        assert set(cfg.encoder_block_types) == {"ResBlock"} and set(cfg.decoder_norm_types) == {"rms_norm"}
        assert cfg.diffusers_kwargs()["decoder_conv_act_fn"] == "silu"
    assert AE_PRESETS["tiny-f4c8"].decoder_conv_act_fn == "relu"  # the demo's AE is unchanged


def test_official_key_layouts():
    """Names in the published efficientvit layout, for the real presets (built on the meta device: no memory)."""
    m10 = efficientvit_key_map(AE_PRESETS["dc-ae-f32c32-in-1.0"])
    ev10 = set(m10.values())
    for k in ("encoder.project_in.conv.conv.weight", "encoder.stages.1.op_list.0.main.conv1.conv.weight",
              "encoder.stages.1.op_list.3.main.conv2.norm.weight", "encoder.stages.1.op_list.4.main.conv.conv.weight",
              "encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight",
              "encoder.stages.3.op_list.0.context_module.main.proj.conv.weight",
              "encoder.stages.3.op_list.0.local_module.main.point_conv.norm.bias",
              "encoder.project_out.main.op_list.0.conv.weight", "decoder.project_in.main.conv.weight",
              "decoder.stages.1.op_list.1.main.conv2.norm.running_var", "decoder.project_out.op_list.0.weight",
              "decoder.project_out.op_list.2.conv.conv.weight"):
        assert k in ev10, k
    ev15 = set(efficientvit_key_map(AE_PRESETS["dc-ae-f64c128-1.5"]).values())
    for k in ("encoder.project_out.op_list.0.conv.weight", "decoder.project_in.conv.weight",
              "decoder.stages.6.op_list.3.main.conv2.norm.weight", "decoder.stages.5.op_list.0.main.conv.conv.weight"):
        assert k in ev15, k
    assert not any("context_module" in k for k in ev15)


@pytest.mark.parametrize("cfg", [TINY_10, TINY_15], ids=lambda c: c.name)
def test_round_trip_bit_for_bit(cfg, tmp_path):
    ours = _random_state(cfg)
    ev = to_efficientvit_state(ours, cfg)
    if cfg is TINY_10:
        qkv = ev["encoder.stages.2.op_list.0.context_module.main.qkv.conv.weight"]
        assert qkv.shape == (3 * 32, 32, 1, 1)  # the fused 1x1 conv of the published layout
    back = to_diffusers_state(ev, cfg)
    assert back.keys() == ours.keys()
    for k in ours:
        assert back[k].dtype == ours[k].dtype and torch.equal(back[k], ours[k]), k
    assert to_efficientvit_state(back, cfg).keys() == ev.keys()
    # through files: a DC-Gen safetensors and a .pt with {"state_dict": ...} load into a working model
    (tmp_path / "model.safetensors").write_bytes(st_save({k: v.contiguous() for k, v in ev.items()}))
    torch.save({"state_dict": ev}, tmp_path / "ckpt.pt")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    want = StructuredAutoencoder(cfg)
    want.net.load_state_dict(ours)
    want.eval()
    for src in (tmp_path, tmp_path / "ckpt.pt"):
        ae = from_efficientvit(str(src), cfg)
        with torch.no_grad():
            assert torch.equal(ae(x), want(x))
    # ... and saved in diffusers' format it loads back with the same fingerprint
    url = ae.save_pretrained(str(tmp_path / "diffusers"))
    assert StructuredAutoencoder.from_pretrained(url).fingerprint() == ae.fingerprint()


def test_encode_first_channels_is_the_adaptive_output_conv():
    torch.manual_seed(0)
    ae = StructuredAutoencoder(TINY_15).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z, z4 = ae.encode(x), ae.encode(x, channels=4)
        conv = ae.net.encoder.conv_out
        assert torch.equal(z4, z[:, :4])
        assert torch.equal(ae.decode_truncated(z4), ae.decode(z, channels=4))
    assert conv.weight.shape[0] == 8


def test_wrong_architecture_truncated_and_missing_are_named(tmp_path):
    from dcae15.weights import MissingWeightsError

    ev = to_efficientvit_state(_random_state(TINY_15), TINY_15)
    (tmp_path / "model.safetensors").write_bytes(st_save({k: v.contiguous() for k, v in ev.items()}))
    with pytest.raises(ValueError, match=r"model.safetensors is not a checkpoint of tiny-1.0.*missing keys"):
        from_efficientvit(str(tmp_path), TINY_10)
    other = AEConfig(**{**TINY_15.to_dict(), "name": "tiny-c16", "latent_channels": 16, "channel_choices": ()})
    with pytest.raises(ValueError, match=r"other shapes \['encoder.conv_out.weight: file \(8, 32, 3, 3\) vs tiny-c16 \(16, 32, 3, 3\)"):
        from_efficientvit(str(tmp_path), other)
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut/model.safetensors is truncated"):
        from_efficientvit(str(tmp_path / "cut"), TINY_15)
    with pytest.raises(MissingWeightsError, match=r"checkpoint .*/nowhere not found"):
        from_efficientvit(str(tmp_path / "nowhere"), TINY_15)

    # diffusers-format directories: truncated weights and another architecture name the file and the mismatch
    ae = StructuredAutoencoder(TINY_15)
    url = ae.save_pretrained(str(tmp_path / "d"))
    w = tmp_path / "d" / "diffusion_pytorch_model.safetensors"
    full = w.read_bytes()
    w.write_bytes(full[:100])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors are truncated"):
        StructuredAutoencoder.from_pretrained(url)
    w.write_bytes(full)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["_dcae15"]["latent_channels"], cfg["_dcae15"]["channel_choices"] = 16, [8, 16]
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors is not a checkpoint of tiny-1.5.*"
                                         r"encoder.conv_out.weight: file \(8, 32, 3, 3\)"):
        StructuredAutoencoder.from_pretrained(url)


def test_save_pretrained_writes_the_measured_scaling_factor(tmp_path):
    ae = StructuredAutoencoder.from_preset("tiny-f4c8")
    assert ae.scaling_factor is None
    url = ae.save_pretrained(str(tmp_path / "ae"), scaling_factor=0.73)
    cfg = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert cfg["scaling_factor"] == 0.73 and cfg["_dcae15"]["scaling_factor"] == 0.73
    assert StructuredAutoencoder.from_pretrained(url).scaling_factor == 0.73
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        ae.save_pretrained(str(tmp_path / "bad"), scaling_factor=-1.0)
