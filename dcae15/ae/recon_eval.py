"""Reconstruction quality of an autoencoder per c' (PSNR, SSIM, LPIPS, rFID): a Parquet table and PNG figures."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dcae15.ae.model import StructuredAutoencoder
from dcae15.metrics.image_quality import LPIPSMetric, psnr, ssim
from dcae15.parallel import default_device, place
from dcae15.pixels import from_uint8_nhwc, to_uint8, to_uint8_nhwc

__all__ = ["ReconEvalConfig", "default_eval_channels", "evaluate_reconstruction", "format_table"]


def default_eval_channels(ae: StructuredAutoencoder, max_columns: int = 6) -> tuple[int, ...]:
    """About ``max_columns`` c' values spread over the AE's list (always the full c); just c if unstructured."""
    choices = ae.channel_choices
    if not choices:
        return (ae.latent_channels,)
    step = max(1, -(-len(choices) // max_columns))
    return tuple(sorted(set(choices[::step]) | {ae.latent_channels}))


@dataclass(kw_only=True)
class ReconEvalConfig:
    """What to evaluate.

    Attributes:
        resolution: centre-crop size of the evaluation images.
        num_images: how many valid images from the start of the dataset (the paper: 50k ImageNet val).
        channels: the c' values (None: ``default_eval_channels``).
        batch_size: images per encode/decode batch.
        lpips_net: "alex" (the metric convention), "vgg", "squeeze", or None to skip LPIPS.
        lpips_weights / lpips_random_backbone: see ``dcae15.metrics.lpips_offline`` (random: tests only).
        grid_images: images shown in the figures.
        device: "cpu", "cuda", "auto".
        finetune: when set, also score each c' after a decoder-only fine-tune at that c' (the paper's Figure 3
            setting; ``dcae15.ae.recipe.finetune_decoder``): ``AETrainConfig`` fields of that phase (steps,
            batch_size, lr, perceptual, ...; resolution defaults to ``resolution``). Rows get ``setting``
            "as_trained" or "decoder_finetuned".
        finetune_channels: the c' to fine-tune (None: every evaluated c').
        finetune_url: where the fine-tuned decoders land (None: ``<out_url>/finetune``).
    """

    resolution: int
    num_images: int = 1000
    channels: tuple[int, ...] | None = None
    batch_size: int = 32
    lpips_net: str | None = "alex"
    lpips_weights: str | None = None
    lpips_random_backbone: bool = False
    grid_images: int = 6
    device: str = "auto"
    finetune: dict[str, Any] | None = None
    finetune_channels: tuple[int, ...] | None = None
    finetune_url: str | None = None

    def __post_init__(self) -> None:
        for f in ("resolution", "num_images", "batch_size", "grid_images"):
            if getattr(self, f) < 1:
                raise ValueError(f"ReconEvalConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.lpips_net not in (None, "alex", "vgg", "squeeze"):
            raise ValueError(f"ReconEvalConfig.lpips_net={self.lpips_net!r}; allowed: alex, vgg, squeeze, None")
        if self.channels is not None:
            self.channels = tuple(int(c) for c in self.channels)
        if self.finetune_channels is not None:
            self.finetune_channels = tuple(int(c) for c in self.finetune_channels)
        if self.finetune is not None and not isinstance(self.finetune, dict):
            raise ValueError(f"ReconEvalConfig.finetune must be a mapping of AETrainConfig fields, got {self.finetune!r}")
        if self.finetune is not None:  # the fine-tune phase's fields, checked now rather than after the first scores
            from dcae15.ae.train import AETrainConfig
            from dcae15.typed_config import check_fields

            self.finetune = check_fields(AETrainConfig, self.finetune, "ReconEvalConfig.finetune")


class _Gaussian:
    """Running mean / covariance of features (so rFID over many images never holds them all)."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, None, None

    def add(self, f: torch.Tensor) -> None:
        x = f.double().cpu()
        self.s1 = x.sum(0) if self.s1 is None else self.s1 + x.sum(0)
        self.s2 = x.T @ x if self.s2 is None else self.s2 + x.T @ x
        self.n += x.shape[0]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


def evaluate_reconstruction(ae_url: str, dataset_url: str, out_url: str | None, cfg: ReconEvalConfig, *,
                            extractor: Any = None, storage_options: dict | None = None, print_table: bool = True
                            ) -> list[dict[str, Any]]:
    """Reconstruct the first ``num_images`` valid images from the first c' channels for each c' and score them.

    Args:
        ae_url / dataset_url: a saved AE and a packed dataset.
        out_url: folder for ``recon.parquet``, ``recon_grid.png`` (Figure 3), ``latent_channel_mean.png``
            (Figure 2) and ``psnr_vs_channels.png``; None writes nothing.
        extractor: a ``dcae15.metrics.fidelity.FeatureExtractorSpec`` (Inception or the proxy) for rFID; None
            skips rFID. Its ``prefix`` names the column (``rfid`` or ``proxy-rfid``).

    Returns:
        One row per c' (and per setting with ``cfg.finetune``): ae/dataset fingerprints, setting, channels,
        num_images, psnr, ssim, lpips (NaN when skipped), rfid.
    """
    from storage.shards import open_dataset

    device = default_device(cfg.device)
    ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options)
    ae_fp = ae.fingerprint()
    if cfg.resolution % ae.spatial_compression:
        raise ValueError(f"resolution={cfg.resolution} is not a multiple of the AE's compression {ae.spatial_compression}")
    channels = cfg.channels or default_eval_channels(ae)
    bad = [c for c in channels if not 1 <= c <= ae.latent_channels]
    if bad:
        raise ValueError(f"channels {bad} outside 1..{ae.latent_channels}")
    if ae.config.bottleneck_shortcut and channels != (ae.latent_channels,):
        raise ValueError(f"{ae.config.name} has bottleneck shortcuts: only channels=({ae.latent_channels},) is defined")
    ft_channels = cfg.finetune_channels or channels
    ft_url = cfg.finetune_url or (None if out_url is None else out_url.rstrip("/") + "/finetune")
    if cfg.finetune is not None and ft_url is None:
        raise ValueError("ReconEvalConfig.finetune needs a place for the fine-tuned decoders: set finetune_url or out_url")
    dataset = open_dataset(dataset_url, storage_options)
    lpips = None
    if cfg.lpips_net:
        lpips = LPIPSMetric(cfg.lpips_net, weights=cfg.lpips_weights, random_backbone=cfg.lpips_random_backbone,
                            device=device)
    feat_net = None
    if extractor is not None:
        feat_net = extractor.build([extractor.layers["fid"]], device).eval()
    scorer = _Scorer(dataset, cfg, device, lpips, feat_net)

    grid: dict[str, Any] = {}
    rows = scorer.rows(place(ae, device).eval(), channels, grid)
    for r in rows:
        r["setting"] = "as_trained"
    if cfg.finetune is not None:
        from dcae15.ae.recipe import finetune_decoder

        train = {"resolution": cfg.resolution, "device": cfg.device, **cfg.finetune}
        for c in ft_channels:
            ptr = finetune_decoder(ae_url, dataset_url, ft_url, channels=c, train=train, ae_fingerprint=ae_fp,
                                   dataset=dataset, storage_options=storage_options)
            ft = StructuredAutoencoder.from_pretrained(ptr["model_url"], storage_options=storage_options)
            for r in scorer.rows(place(ft, device).eval(), (c,), None):
                rows.append({**r, "setting": "decoder_finetuned", "finetune_steps": int(ptr["steps"]),
                             "finetune_model_url": ptr["model_url"]})
    out = []
    for r in rows:
        r = {"finetune_steps": 0, "finetune_model_url": "", **r}  # one schema for every row (Parquet)
        row = {"ae_name": ae.config.name, "ae_fingerprint": ae_fp, "dataset_fingerprint": str(dataset.fingerprint),
               "resolution": cfg.resolution, "setting": r.pop("setting"), **r,
               "lpips_net": cfg.lpips_net or "", "feature_extractor": extractor.label if extractor else ""}
        if feat_net is not None:
            row[extractor.metric_name("rfid")] = row.pop("rfid")
        out.append(row)
    if print_table:
        print(format_table(out))
    if out_url is not None:
        _write_outputs(out_url, out, grid["x"], grid["z"], grid["y"], channels, ae.config.name, storage_options)
    return out


class _Scorer:
    """Scores an AE's reconstructions of the same first ``num_images`` valid images; the real-image feature
    statistics for rFID are computed once and shared by every model scored."""

    def __init__(self, dataset, cfg: ReconEvalConfig, device, lpips, feat_net) -> None:
        self.dataset, self.cfg, self.device, self.lpips, self.feat_net = dataset, cfg, device, lpips, feat_net
        self.real: _Gaussian | None = None

    def rows(self, ae: StructuredAutoencoder, channels: tuple[int, ...], grid: dict | None) -> list[dict[str, Any]]:
        cfg, dataset, device = self.cfg, self.dataset, self.device
        feat_net, lpips = self.feat_net, self.lpips
        real_g = _Gaussian() if feat_net is not None and self.real is None else None
        fake_g = {c: _Gaussian() for c in channels}
        sums = {c: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for c in channels}
        count, start = 0, 0
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.num_images, desc="recon eval", disable=None)
        with torch.inference_mode():
            while count < cfg.num_images and start < dataset.num_samples:
                stop = min(start + cfg.batch_size, dataset.num_samples)
                images, _, valid = dataset.read_range(start, stop, cfg.resolution)
                start = stop
                images = images[np.asarray(valid, bool)][: cfg.num_images - count]
                if not len(images):
                    continue
                x = from_uint8_nhwc(torch.from_numpy(images).to(device))
                z = ae.encode(x)
                if real_g is not None:
                    real_g.add(_features(feat_net, to_uint8(x)))
                if grid is not None and "x" not in grid:
                    grid.update(x=images[: cfg.grid_images], z=z[: cfg.grid_images].float().cpu().numpy(), y={})
                for c in channels:
                    y = ae.decode(z, channels=c).float().clamp(-1, 1)
                    sums[c]["psnr"] += float(psnr(x, y).sum())
                    sums[c]["ssim"] += float(ssim(x, y).sum())
                    if lpips is not None:
                        sums[c]["lpips"] += float(lpips(x, y).sum())
                    if feat_net is not None:
                        fake_g[c].add(_features(feat_net, to_uint8(y)))
                    if grid is not None and c not in grid["y"]:
                        grid["y"][c] = to_uint8_nhwc(y[: cfg.grid_images])
                count += len(images)
                bar.update(len(images))
        bar.close()
        if count == 0:
            raise ValueError(f"no valid images in {dataset.url}")
        if real_g is not None:
            self.real = real_g
        rows = []
        for c in channels:
            row = {"channels": int(c), "num_images": count, "psnr": sums[c]["psnr"] / count,
                   "ssim": sums[c]["ssim"] / count,
                   "lpips": sums[c]["lpips"] / count if lpips is not None else float("nan")}
            if feat_net is not None:
                from dcae15.metrics.fidelity import frechet_distance

                if count < 2:
                    raise ValueError("rFID needs at least 2 images")
                row["rfid"] = frechet_distance(*self.real.stats(), *fake_g[c].stats())
            rows.append(row)
        return rows


def _features(net: torch.nn.Module, images_u8: torch.Tensor) -> torch.Tensor:
    """torch-fidelity extractors take uint8 [B,3,H,W] and return one tensor per requested layer."""
    out = net(images_u8)
    return (out[0] if isinstance(out, (tuple, list)) else out).flatten(1)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the per-c' rows."""
    metric_cols = [k for k in ("psnr", "ssim", "lpips") if k in rows[0]] + sorted(k for k in rows[0] if k.endswith("rfid"))
    head = f"{'c_prime':>7} {'setting':>17} " + " ".join(f"{k:>10}" for k in metric_cols)
    lines = [f"{rows[0]['ae_name']} ({rows[0]['ae_fingerprint']}), {rows[0]['num_images']} images @ "
             f"{rows[0]['resolution']}px", head]
    for r in rows:
        lines.append(f"{r['channels']:>7} {r.get('setting', 'as_trained'):>17} " +
                     " ".join(f"{r[k]:>10.4f}" for k in metric_cols))
    return "\n".join(lines)


def _write_outputs(out_url, rows, grid_x, grid_z, grid_y, channels, name, storage_options) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcae15.ae.plots import channel_mean_png, metric_curve_png, recon_grid_png
    from storage.urls import put_atomic, url_to_fs

    fs, root = url_to_fs(out_url, storage_options)
    root = root.rstrip("/")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    put_atomic(fs, f"{root}/recon.parquet", buf.getvalue())
    put_atomic(fs, f"{root}/recon_grid.png", recon_grid_png(grid_x, grid_y, title=f"{name}: reconstruction from the first c' channels"))
    put_atomic(fs, f"{root}/latent_channel_mean.png",
               channel_mean_png(grid_x, grid_z, channels, title=f"{name}: channel-wise mean of the latent"))
    trained = [r for r in rows if r.get("setting", "as_trained") == "as_trained"]
    put_atomic(fs, f"{root}/psnr_vs_channels.png",
               metric_curve_png([r["channels"] for r in trained], [r["psnr"] for r in trained], title=name))
