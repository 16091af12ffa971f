"""Reconstruction evaluation per c': table (Parquet), PSNR/SSIM/LPIPS/rFID, figures."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import torch
import pytest

from dcae15.ae.recon_eval import ReconEvalConfig, evaluate_reconstruction


def test_recon_eval_per_channel_table_and_figures(shapes_dataset, tiny_ae_url, tmp_path, capsys):
    from dcae15.metrics.proxy import ProxyConfig, proxy_extractor

    extractor = proxy_extractor(shapes_dataset, ProxyConfig(epochs=1, width=8), cache_url=str(tmp_path / "cache"))
    cfg = ReconEvalConfig(resolution=32, num_images=12, channels=(8, 16, 32), batch_size=5, lpips_net="squeeze",
                          lpips_random_backbone=True, grid_images=3, device="cpu")
    rows = evaluate_reconstruction(tiny_ae_url, shapes_dataset, str(tmp_path / "out"), cfg, extractor=extractor)
    assert [r["channels"] for r in rows] == [8, 16, 32]
    for r in rows:
        assert r["num_images"] == 12 and 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1
        assert r["lpips"] > 0 and math.isfinite(r["proxy-rfid"]) and r["proxy-rfid"] >= 0
        assert r["feature_extractor"].startswith("proxy")
    table = pq.read_table(tmp_path / "out" / "recon.parquet").to_pylist()
    assert [t["channels"] for t in table] == [8, 16, 32] and table[0]["psnr"] == pytest.approx(rows[0]["psnr"])
    for name in ("recon_grid.png", "latent_channel_mean.png", "psnr_vs_channels.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "c_prime" in capsys.readouterr().out


def test_recon_eval_refuses_bad_channels(shapes_dataset, tiny_ae_url):
    cfg = ReconEvalConfig(resolution=32, num_images=2, channels=(40,), lpips_net=None, device="cpu")
    with pytest.raises(ValueError, match="outside 1..32"):
        evaluate_reconstruction(tiny_ae_url, shapes_dataset, None, cfg, print_table=False)
    with pytest.raises(ValueError, match="lpips_net"):
        ReconEvalConfig(resolution=32, lpips_net="resnet")


def test_recon_eval_as_trained_and_decoder_finetuned(shapes_dataset, tiny_ae_url, tmp_path):
    """The Figure 3 setting: each c' also scored after a decoder-only fine-tune at that c' (a cached phase run)."""
    from dcae15.ae.model import StructuredAutoencoder

    ft = dict(steps=12, batch_size=8, lr=3e-3, perceptual="none", hflip=False, checkpoint_every=12, log_every=6)
    cfg = ReconEvalConfig(resolution=32, num_images=16, channels=(8, 32), batch_size=8, lpips_net=None, device="cpu",
                          finetune=ft, finetune_channels=(8,))
    rows = evaluate_reconstruction(tiny_ae_url, shapes_dataset, str(tmp_path / "out"), cfg, print_table=False)
    assert [(r["setting"], r["channels"]) for r in rows] == [("as_trained", 8), ("as_trained", 32),
                                                            ("decoder_finetuned", 8)]
    trained8, tuned8 = rows[0], rows[2]
    assert tuned8["finetune_steps"] == 12 and tuned8["psnr"] > trained8["psnr"] + 1.0, (trained8, tuned8)
    # only the decoder moved: the latent the diffusion model sees is the same
    base, tuned = StructuredAutoencoder.from_pretrained(tiny_ae_url), StructuredAutoencoder.from_pretrained(
        tuned8["finetune_model_url"])
    for (n, a), (_, b) in zip(base.state_dict().items(), tuned.state_dict().items()):
        assert torch.equal(a, b) == n.startswith("net.encoder"), n
    table = pq.read_table(tmp_path / "out" / "recon.parquet").to_pylist()
    assert [t["setting"] for t in table] == ["as_trained", "as_trained", "decoder_finetuned"]
    # a second evaluation reuses the finished fine-tune run
    runs = sorted(p.name for p in (tmp_path / "out" / "finetune").iterdir())
    again = evaluate_reconstruction(tiny_ae_url, shapes_dataset, None, ReconEvalConfig(
        **{**cfg.__dict__, "finetune_url": str(tmp_path / "out" / "finetune")}), print_table=False)
    assert again[2]["psnr"] == pytest.approx(tuned8["psnr"])
    assert sorted(p.name for p in (tmp_path / "out" / "finetune").iterdir()) == runs
