"""Sample a trained diffusion run into a resumable uint8 sample store, decoding with the store's autoencoder."""

from __future__ import annotations

import numpy as np
import torch

from dcae15.diffusion.checkpoint import checkpoint_url, load_ema_state, read_latest, read_run_config
from dcae15.diffusion.objectives import make_objective
from dcae15.diffusion.samplers import SAMPLERS, sample_latents
from dcae15.models.registry import ModelConfig, build_model
from storage.fingerprint import fingerprint

__all__ = ["DEFAULT_SAMPLER", "LABEL_MODES", "load_run_model", "make_labels", "denormalize", "to_uint8",
           "sample_to_store"]

DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "heun"}
LABEL_MODES = ("uniform", "balanced")


def _resolve_checkpoint(run_url: str, checkpoint, storage_options) -> tuple[int, str]:
    if checkpoint is None:
        ptr = read_latest(run_url, storage_options)
        if ptr is None:
            raise FileNotFoundError(f"diffusion run {run_url!r} has no checkpoint yet ('latest' missing)")
        return int(ptr["step"]), ptr["checkpoint"]
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
        return int(checkpoint), checkpoint_url(run_url, int(checkpoint))
    return -1, str(checkpoint)  # an explicit checkpoint URL


def load_run_model(run_url: str, *, checkpoint: int | str | None = None, ema: bool = True,
                   device: torch.device | str = "cpu", storage_options: dict | None = None):
    """(model in eval mode, run config dict, step) for a run's checkpoint (latest by default), EMA weights."""
    conf = read_run_config(run_url, storage_options)
    step, url = _resolve_checkpoint(run_url, checkpoint, storage_options)
    model = build_model(ModelConfig(**conf["model_config"]))
    load_ema_state(url, model, which="ema" if ema else "model", storage_options=storage_options)
    return model.to(device).eval(), conf, step


def make_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Class labels for all samples: 'uniform' (i.i.d. uniform, official FID protocol) or 'balanced' (each class
    num_samples / num_classes times, shuffled)."""
    if mode not in LABEL_MODES:
        raise ValueError(f"labels={mode!r}; allowed: {LABEL_MODES}")
    rng = np.random.default_rng([seed, 7])
    if mode == "uniform":
        return rng.integers(0, num_classes, num_samples)
    return rng.permutation(np.arange(num_samples) % num_classes)


def denormalize(z: torch.Tensor, norm: dict) -> torch.Tensor:
    """Undo the reader's normalisation (recorded in the run's config.yaml) to get raw AE latents."""
    mode = norm["mode"]
    if mode == "scaling_factor":
        return z / float(norm["scaling_factor"])
    if mode == "channel_stats":
        mean = torch.tensor(norm["channel_mean"], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(norm["channel_std"], dtype=z.dtype, device=z.device).clamp_min(1e-8).view(1, -1, 1, 1)
        return z * std + mean
    return z


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _load_ae(conf: dict, ae_url: str | None, device, storage_options):
    from dcae15.autoencoder import StructuredAutoencoder

    url = ae_url or conf.get("ae_url")
    if not url:
        raise ValueError("the run's latent store records no 'ae_url'; pass ae_url= to decode the samples")
    ae = StructuredAutoencoder.from_pretrained(url, storage_options=storage_options)
    fp = ae.fingerprint()
    if fp != conf["ae_fingerprint"]:
        raise ValueError(f"autoencoder at {url!r} has fingerprint {fp!r} but the run was trained on latents of "
                         f"{conf['ae_fingerprint']!r}; decode with the store's autoencoder")
    return ae.to(device).eval()


@torch.no_grad()
def sample_to_store(run_url: str, out_url: str, *, num_samples: int, sampler: str | None = None, steps: int = 50,
                    cfg_scale: float = 1.0, seed: int = 0, checkpoint: int | str | None = None,
                    guidance_interval: tuple[float, float] = (0.0, 1.0), labels: str = "uniform",
                    batch_size: int = 64, chunk_size: int = 256, ema: bool = True, ae_url: str | None = None,
                    device: str | torch.device | None = None, progress: bool = True,
                    storage_options: dict | None = None) -> str:
    """Generate ``num_samples`` images into the sample store at ``out_url``; a rerun writes only missing units.

    Every unit's noise comes from a generator seeded by (seed, unit, batch), so a resumed job writes the same
    images an uninterrupted one would.

    Args:
        run_url: a diffusion run directory.
        sampler: 'ddpm'/'ddim' (epsilon models) or 'euler'/'heun'/'dopri5' (flow); None = ddpm / heun.
        steps: sampler steps (respaced DDPM steps, ODE steps); ignored by dopri5.
        cfg_scale, guidance_interval: classifier-free guidance and its normalised-time window (1 = noise).
        checkpoint: step number, checkpoint URL, or None for ``latest``.
        labels: 'uniform' or 'balanced' class labels.
        ae_url: override the autoencoder location recorded in the store (its fingerprint is still checked).

    Returns:
        ``out_url``.
    """
    from tqdm.auto import tqdm

    from storage.sample_store import SampleStore

    if num_samples < 1 or batch_size < 1 or chunk_size < 1:
        raise ValueError(f"num_samples, batch_size, chunk_size must be >= 1; got {num_samples}, {batch_size}, "
                         f"{chunk_size}")
    lo, hi = (float(v) for v in guidance_interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval={guidance_interval!r} must satisfy 0 <= lo <= hi <= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, conf, step = load_run_model(run_url, checkpoint=checkpoint, ema=ema, device=device,
                                       storage_options=storage_options)
    objective = make_objective(conf["objective"])
    sampler = sampler or DEFAULT_SAMPLER[objective.kind]
    if sampler not in SAMPLERS[objective.kind]:
        raise ValueError(f"sampler {sampler!r} does not fit a {objective.kind} model; allowed: "
                         f"{SAMPLERS[objective.kind]}")
    mc = conf["model_config"]
    ae = _load_ae(conf, ae_url, device, storage_options)
    res = int(conf.get("resolution") or mc["input_size"][0] * ae.spatial_compression)
    spec = {"run_id": conf["run_id"], "checkpoint_step": step, "sampler": sampler, "steps": int(steps),
            "cfg_scale": float(cfg_scale), "guidance_interval": [lo, hi], "seed": int(seed), "labels": labels,
            "ema": bool(ema), "ae_fingerprint": conf["ae_fingerprint"]}
    store = SampleStore.create(out_url, num_samples=num_samples, height=res, width=res, chunk_size=chunk_size,
                               attrs={**spec, "spec_fingerprint": fingerprint(spec)}, storage_options=storage_options)
    all_labels = make_labels(num_samples, mc["num_classes"], labels, seed)
    shape = (mc["in_channels"], *mc["input_size"])
    missing = store.missing_units()
    for unit in tqdm(missing, desc="sample units", disable=not progress):
        a, b = store.unit_bounds(unit)
        images = []
        for i, s in enumerate(range(a, b, batch_size)):
            y = torch.from_numpy(all_labels[s:min(b, s + batch_size)]).long()
            gen = torch.Generator().manual_seed(int(fingerprint(["sample", seed, unit, i]), 16) % 2**63)
            z = sample_latents(model, objective, shape=(len(y), *shape), labels=y, sampler=sampler, steps=steps,
                               generator=gen, cfg_scale=cfg_scale, guidance_interval=(lo, hi),
                               null_class=mc["num_classes"], device=device)
            images.append(to_uint8(ae.decode(denormalize(z, conf["latent_norm"]))))
        store.write_unit(unit, np.concatenate(images), all_labels[a:b])
    return out_url
