"""Toy-scale replication of DC-AE 1.5's Figure 3 / Table 1 (structured latent space) and Table 5 (SLS x ADT).

Run from the repository root:

    .venv/bin/python -m experiments.replicate --root out/replicate-learns --results-dir experiments

Stages (each writes ``<root>/stages/<name>.json`` last; a rerun skips finished stages and the library's trainers
resume inside a stage, so killing the process and rerunning continues):

1. data       generated shapes dataset (or ``--data`` image folder) packed into webdataset shards
2. proxy      proxy classifier (proxy-FID / proxy-rFID / proxy-LPIPS features) + reference statistics
3. ae-*       two autoencoders, identical budgets and seed: plain (no masking) and structured (Eq. 1)
4. recon-*    Figure 3 / Table 1: PSNR, SSIM, proxy-LPIPS, proxy-rFID from the first c' channels, as trained
              and after a decoder-only fine-tune per c' (same budget for both AEs)
5. encode-*   both AEs' latent stores
6. dit-*      the same tiny backbone (the scale's: SiT-tiny by default) trained 4 ways (plain/structured AE x
              without/with ADT) per seed, then proxy-FID and class accuracy of its EMA weights at every checkpoint
   ae-*-a<s>, recon-*-a<s>   extra AE seeds (Scale.ae_seeds): the Figure 3 / Table 1 spread
7. report     tables, PNG figures and RESULTS-<scale>.md with the verdicts against the issue's targets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Scale", "SCALES", "run", "main"]

AE_KINDS = ("plain", "structured")


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Every budget of one replication setting (both AEs and all diffusion runs get identical budgets)."""

    num_classes: int = 8
    """Synthetic dataset: shape classes (ignored with --data)."""
    per_class: int = 256
    """Synthetic dataset: images per class."""
    resolution: int = 32
    look: dict = field(default_factory=lambda: {"texture": 1.0, "noise": 6.0, "scale": (0.22, 0.38)})
    """Synthetic dataset look (``storage.synthetic.make_shapes_dataset`` options). The original full-detail look,
    which the ``small`` scale's report was measured on; the demo's learnable look (configs/demo.yaml) is texture 0.1,
    noise 2, scale (0.36, 0.48), flat background, jitter 0.3."""
    ae_preset: str = "tiny-f8c32"
    """tiny-f8c32 at 32 px -> 32x4x4 latents (c / (h*w) = 2, as f32c128 at 256 px: 128x8x8)."""
    ae_steps: int = 3000
    ae_batch: int = 16
    ae_lr: float = 3e-4
    ae_warmup: int = 0
    ae_schedule: str = "constant"
    """AE learning-rate schedule after the linear warm-up: "constant" or "cosine" (to 0 at ``ae_steps``)."""
    ft_channels: tuple[int, ...] = ()
    """c' values that get a decoder-only fine-tune; () = a quarter and a half of c."""
    ae_seeds: tuple[int, ...] = ()
    """Extra autoencoder seeds (both kinds, same budgets) trained and evaluated only for Figure 3 / Table 1, so
    their verdicts have a spread over AE seeds; the diffusion runs use the ``--ae-seed`` AEs."""
    ft_steps: int = 400
    ft_lr: float | None = None
    """lr of the decoder-only fine-tunes (constant); None = ``ae_lr``."""
    recon_images: int = 512
    proxy_epochs: int = 8
    proxy_width: int = 16
    dit_model: str = "DiT-tiny"
    dit_overrides: dict = field(default_factory=dict)
    dit_patch: int = 1
    """Latent patch size of the backbone (2 on 8x8 latents: 16 tokens)."""
    dit_steps: int = 600
    dit_batch: int = 64
    dit_lr: float = 5e-4
    dit_warmup: int = 50
    dit_ema: float = 0.999
    eval_every: int = 100
    eval_samples: int = 500
    sampler: str = "ddim"
    sample_steps: int = 20
    cfg_scale: float = 1.0
    """Classifier-free guidance of the evaluation samples (1 = none)."""
    structure_eval: bool = True
    """Re-score the samples with a second proxy trained at half the resolution (added when the main proxy was not
    blur-robust; the main proxy is now trained with blur/noise augmentation, so newer scales turn this off)."""
    seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        for f in ("num_classes", "per_class", "resolution", "ae_steps", "ae_batch", "ft_steps", "recon_images",
                  "proxy_epochs", "dit_steps", "dit_batch", "eval_every", "eval_samples", "sample_steps"):
            if getattr(self, f) < 1:
                raise ValueError(f"Scale.{f} must be >= 1, got {getattr(self, f)}")
        if self.eval_samples < 2:
            raise ValueError("Scale.eval_samples must be >= 2 (FID needs a covariance)")
        if not self.seeds:
            raise ValueError("Scale.seeds must name at least one seed")


#: The demo's learnable look (configs/demo.yaml): large centred shapes, faint texture, flat background.
LEARNABLE_LOOK = {"texture": 0.1, "noise": 2.0, "scale": (0.36, 0.48), "background": "flat", "jitter": 0.3}

DEFAULT_SCALE = "learns"

SCALES: dict[str, Scale] = {
    # The default (issue 12): the demo's setting that learns. 3072 images at 32 px in the demo's look; two f4c8
    # AEs (8x8x8 latents, c' list 2..8) trained as the demo's (1600 steps, lr 2e-3, warm-up + cosine); SiT-tiny
    # (flow matching, 2x2 patches = 16 tokens, label embedding std 1, lr 2e-3, EMA 0.99) x 4 variants x 3 seeds,
    # scored at 4 checkpoints with Heun + CFG as the demo samples. Cost: see RESULTS-learns.md (stage times).
    "learns": Scale(per_class=384, look=LEARNABLE_LOOK, ae_preset="tiny-f4c8", ae_steps=1600, ae_batch=32, ae_lr=2e-3,
                    ae_warmup=100, ae_schedule="cosine", ae_seeds=(1, 2), ft_channels=(2, 4, 6), ft_steps=400,
                    ft_lr=5e-4, proxy_epochs=10,
                    dit_model="SiT-tiny", dit_patch=2, dit_steps=2400, dit_batch=64, dit_lr=2e-3, dit_warmup=50,
                    dit_ema=0.99, eval_every=300, eval_samples=384, sampler="heun", sample_steps=16, cfg_scale=2.5,
                    structure_eval=False, seeds=(0, 1, 2)),
    # The original setting (full-detail look, f8c32, DDPM DiT): its baseline never improved (experiments/RESULTS.md
    # before issue 12 in git history). ~30 min on this shared 2-core CPU (measured: AE ~20 steps/s, DiT ~7 steps/s, ~5 s per proxy-FID point).
    # 2048 images at 32 px; two 3000-step AEs; 8 DiT runs of 600 steps, proxy-FID every 100.
    "small": Scale(),
    # ~1 h on a quiet 2-core CPU: 2x the images, 2x the AE steps, a fine-tune for every c', 3 seeds x 1600 steps.
    "full": Scale(per_class=512, ae_steps=6000, ft_channels=(8, 12, 16, 20, 24, 28), recon_images=1024,
                  dit_steps=1600, eval_every=200, eval_samples=1000, sample_steps=25, seeds=(0, 1, 2)),
    # seconds: the smoke test's setting (numbers are meaningless).
    # The default's code paths (learnable look, f4c8 + cosine, SiT flow + patch 2, Heun + CFG) plus the secondary
    # structure scorer, on minimal budgets.
    "smoke": Scale(num_classes=4, per_class=16, look=LEARNABLE_LOOK, ae_preset="tiny-f4c8", ae_steps=4, ae_batch=8,
                   ae_warmup=1, ae_schedule="cosine", ae_seeds=(1,), ft_steps=2, ft_lr=5e-4, recon_images=16, proxy_epochs=1,
                   proxy_width=4, dit_model="SiT-tiny", dit_overrides={"hidden": 32, "depth": 2, "heads": 2},
                   dit_patch=2, dit_steps=4, dit_batch=16, dit_warmup=0, eval_every=2, eval_samples=16,
                   sampler="heun", sample_steps=2, cfg_scale=2.5, seeds=(0, 1)),
}


# ---------------------------------------------------------------------------------------------------------------
# Stage markers
# ---------------------------------------------------------------------------------------------------------------


class Stages:
    """``<root>/stages/<name>.json`` holds a finished stage's result and seconds; written last, atomically."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> dict | None:
        p = self.path(name)
        return json.loads(p.read_text()) if p.exists() else None

    def run(self, name: str, fn: Callable[[], Any], valid: Callable[[Any], bool] | None = None) -> Any:
        """The stage's stored result, or run it; ``valid`` rejects a stored result made with other budgets (e.g.
        fewer diffusion steps: the stage then runs again and its trainer continues from the last checkpoint)."""
        done = self.get(name)
        if done is not None and (valid is None or valid(done["result"])):
            return done["result"]
        print(f"[replicate] stage {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t0, 2)
        tmp = self.path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"result": result, "seconds": seconds, "finished": time.time()}, indent=1))
        os.replace(tmp, self.path(name))
        print(f"[replicate] stage {name} done in {seconds:.1f} s", flush=True)
        return result

    def all(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))}


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


def _data(root: Path, sc: Scale, data: str | None) -> dict:
    from storage.shards import pack_image_folder
    from storage.synthetic import make_shapes_dataset

    if data is None:
        src = root / "src" / "shapes"
        make_shapes_dataset(str(src), num_classes=sc.num_classes, per_class=sc.per_class, size=sc.resolution, seed=0,
                            **sc.look)
        name = "shapes"
    else:
        src, name = Path(data), Path(data).name
    dst = root / "data" / name
    info = pack_image_folder(str(src), str(dst), name=name, progress=False)
    return {"url": str(dst), "source": str(src), "num_samples": int(getattr(info, "num_samples", 0) or 0)}


def _proxy(root: Path, sc: Scale, ds_url: str) -> dict:
    from dcae15.metrics.proxy import ProxyConfig, proxy_extractor
    from dcae15.metrics.reference import reference_stats

    spec = proxy_extractor(ds_url, ProxyConfig(resolution=sc.resolution, width=sc.proxy_width, epochs=sc.proxy_epochs),
                           cache_url=str(root / "eval"), verbose=True)
    ref = reference_stats(ds_url, sc.resolution, spec, cache_url=str(root / "eval"))
    return {"reference_url": ref, "extractor_label": spec.label, **dict(spec.info)}


def _extractor(root: Path, sc: Scale, ds_url: str):
    from dcae15.metrics.proxy import ProxyConfig, proxy_extractor

    return proxy_extractor(ds_url, ProxyConfig(resolution=sc.resolution, width=sc.proxy_width, epochs=sc.proxy_epochs),
                           cache_url=str(root / "eval"))


def _ae(root: Path, sc: Scale, ds_url: str, kind: str, seed: int, name: str | None = None, *,
        include_full: bool = False) -> dict:
    """Train one AE (resumes); ``include_full``: a full-channel decoder pass every step (structured only)."""
    from dcae15.ae.train import AETrainConfig, train_autoencoder

    cfg = AETrainConfig(preset=sc.ae_preset, resolution=sc.resolution, steps=sc.ae_steps, batch_size=sc.ae_batch,
                        lr=sc.ae_lr, warmup_steps=sc.ae_warmup, schedule=sc.ae_schedule, perceptual="none",
                        structured=kind != "plain", include_full=include_full, seed=seed,
                        checkpoint_every=max(1, sc.ae_steps // 4), log_every=max(1, min(50, sc.ae_steps)),
                        device="cpu")
    out = train_autoencoder(cfg, ds_url, str(root / "runs" / "ae" / (name or kind)))
    return {**out, "config": cfg.to_dict()}


def _ft_channels(sc: Scale, c: int) -> tuple[int, ...]:
    return sc.ft_channels or (c // 4, c // 2)


def _recon(root: Path, sc: Scale, ds_url: str, kind: str, ae: dict, seed: int, name: str | None = None) -> dict:
    """Per-c' reconstruction quality as trained (every c' of the list) and after a decoder fine-tune per c'."""
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.ae.recon_eval import ReconEvalConfig, evaluate_reconstruction
    from experiments.recon import ProxyPerceptual, finetune_decoder, proxy_lpips
    from storage.shards import open_dataset

    spec = _extractor(root, sc, ds_url)
    perceptual = ProxyPerceptual(spec)
    dataset = open_dataset(ds_url)
    model = StructuredAutoencoder.from_pretrained(ae["model_url"])
    c = model.latent_channels
    choices = tuple(model.channel_choices) or (c,)
    ecfg = dict(resolution=sc.resolution, num_images=sc.recon_images, lpips_net=None, grid_images=8, device="cpu")

    def score(url: str, chans: tuple[int, ...], out: str | None) -> list[dict]:
        rows = evaluate_reconstruction(url, ds_url, out, ReconEvalConfig(channels=chans, **ecfg), extractor=spec,
                                       print_table=False)
        for r in rows:
            r["proxy-lpips"] = proxy_lpips(url, dataset, perceptual, channels=r["channels"],
                                           num_images=sc.recon_images, resolution=sc.resolution)
        return rows

    out_dir = root / "recon" / (name or kind)
    as_trained = score(ae["model_url"], choices, str(out_dir / "as_trained"))
    finetuned = []
    for cp in _ft_channels(sc, c):
        ft = finetune_decoder(ae["model_url"], dataset, str(out_dir / f"ft-c{cp}"), channels=cp,
                              steps=sc.ft_steps, batch_size=sc.ae_batch,
                              lr=sc.ft_lr if sc.ft_lr is not None else sc.ae_lr, resolution=sc.resolution,
                              seed=seed)
        for r in score(ft["model_url"], (cp,), None):
            finetuned.append({**r, "finetune_steps": ft["steps"], "finetune_seconds": ft["seconds"],
                              "model_url": ft["model_url"]})
    keep = ("channels", "num_images", "psnr", "ssim", "proxy-lpips", "proxy-rfid")
    strip = lambda rows: [{k: r[k] for k in (*keep, "model_url") if k in r} for r in rows]  # noqa: E731
    return {"latent_channels": c, "channel_choices": list(choices), "as_trained": strip(as_trained),
            "finetuned": strip(finetuned)}


def _encode(root: Path, sc: Scale, ds_url: str, ae: dict) -> dict:
    from dcae15.ae.encode import encode_units, prepare_store
    from storage.latent_store import LatentStore

    url = prepare_store(ae["model_url"], ds_url, str(root), resolution=sc.resolution, flip=True)
    store = LatentStore.open(url)
    missing = store.missing_units()
    if missing:
        encode_units(ae["model_url"], ds_url, url, missing, batch_size=128, device="cpu", progress=True)
    store = LatentStore.open(url)
    stats = store.finalize()
    return {"store_url": url, "scaling_factor": float(store.scaling_factor),
            "channel_rms": [float(v) for v in stats["channel_rms"]], "latent_shape": list(store.latent_shape)}


def _floor(root: Path, sc: Scale, ds_url: str, ae: dict) -> dict:
    """proxy-FID of the AE's reconstructions of ``eval_samples`` training images against the same reference the
    diffusion samples are scored on: what a perfect diffusion model on this AE's latents would get."""
    import numpy as np

    from dcae15.metrics.reference import load_reference
    from experiments.generation import checkpoint_proxy_fid, proxy_class_accuracy
    from experiments.recon import ProxyPerceptual, reconstruct_grid
    from storage.shards import open_dataset

    ds = open_dataset(ds_url)
    images, labels, valid = ds.read_range(0, min(ds.num_samples, sc.eval_samples), sc.resolution)
    images = images[np.asarray(valid, bool)]
    from dcae15.ae.model import StructuredAutoencoder

    c = StructuredAutoencoder.from_pretrained(ae["model_url"]).latent_channels
    recon = np.concatenate([reconstruct_grid(ae["model_url"], images[a:a + 256], c)
                            for a in range(0, len(images), 256)])
    ref = load_reference(_stages(root).get("proxy")["result"]["reference_url"])
    spec = _extractor(root, sc, ds_url)
    classifier = ProxyPerceptual(spec).net
    labels = np.asarray(labels)[np.asarray(valid, bool)]
    return {"reconstruction_proxy_fid": checkpoint_proxy_fid(recon, ref, spec),
            "real_images_proxy_fid": checkpoint_proxy_fid(images, ref, spec), "num_images": int(len(images)),
            "reconstruction_proxy_acc": proxy_class_accuracy(recon, labels, classifier),
            "real_images_proxy_acc": proxy_class_accuracy(images, labels, classifier)}


def _variants(seeds: tuple[int, ...]) -> list[tuple[str, bool, int]]:
    """(AE kind, ADT on, seed): seed-major, so every variant has seed 0 results before any has seed 1."""
    return [(kind, adt, seed) for seed in seeds for kind in AE_KINDS for adt in (False, True)]


def variant_name(kind: str, adt: bool, seed: int) -> str:
    return f"{kind}-{'adt' if adt else 'noadt'}-s{seed}"


def _dit(root: Path, sc: Scale, store: dict, kind: str, adt: bool, seed: int, channels: list[int],
         threads: int, name: str | None = None, *, include_full: bool = False) -> dict:
    """Train one DiT variant (resumes), then proxy-FID of every checkpoint (each cached in its own file).

    ``name`` names the run and its evaluation folder (default: the variant's name); ``include_full``: ADT's loss
    is 1/2 (L_full + L_c') (``ADTConfig.include_full``)."""
    import numpy as np
    import torch

    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.diffusion.adt import ADTConfig
    from dcae15.diffusion.checkpoint import list_checkpoints
    from dcae15.diffusion.train import DiffusionTrainConfig, train_diffusion
    from dcae15.metrics.reference import load_reference
    from experiments.generation import checkpoint_proxy_fid, proxy_class_accuracy, sample_images
    from experiments.recon import ProxyPerceptual
    from storage.latent_store import LatentStore

    name = name or variant_name(kind, adt, seed)
    run_url = str(root / "runs" / "diffusion" / name)
    cfg = DiffusionTrainConfig(model=sc.dit_model, model_overrides=dict(sc.dit_overrides), patch_size=sc.dit_patch,
                               global_batch_size=sc.dit_batch, steps=sc.dit_steps, lr=sc.dit_lr,
                               warmup_steps=sc.dit_warmup, ema_decay=sc.dit_ema,
                               adt=ADTConfig(enabled=adt, channels=list(channels), include_full=include_full),
                               seed=seed,
                               mixed_precision="fp32", checkpoint_every=sc.eval_every, keep_checkpoints=10_000,
                               log_every=max(1, min(50, sc.eval_every)))
    t0 = time.perf_counter()
    out = train_diffusion(cfg, store["store_url"], run_url)
    train_seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)  # the trainer's process group is gone; keep the thread count we asked for

    st = LatentStore.open(store["store_url"])
    ae = StructuredAutoencoder.from_pretrained(st.attrs["ae_url"]).eval()
    spec = _extractor(root, sc, _ds_url(root))
    classifier = ProxyPerceptual(spec).net
    ref = load_reference(_stages(root).get("proxy")["result"]["reference_url"])
    eval_dir = root / "eval" / "gen" / name
    eval_dir.mkdir(parents=True, exist_ok=True)
    curve = []
    for step in list_checkpoints(run_url):
        marker = eval_dir / f"step-{step:07d}.json"
        saved = eval_dir / f"samples-{step:07d}.npz"  # kept so other metrics can score them without re-sampling
        if not marker.exists() or not saved.exists():
            images, labels = sample_images(run_url, step, ae=ae, scaling_factor=float(st.scaling_factor),
                                           num_samples=sc.eval_samples, seed=10_000, sampler=sc.sampler,
                                           sample_steps=sc.sample_steps, cfg_scale=sc.cfg_scale)
            fid = checkpoint_proxy_fid(images, ref, spec)
            acc = proxy_class_accuracy(images, labels, classifier)
            if step == sc.dit_steps:
                np.save(eval_dir / "final_samples.npy", images[:32])
            with open(saved.with_suffix(".tmp"), "wb") as f:
                np.savez(f, images=images, labels=labels)
            os.replace(saved.with_suffix(".tmp"), saved)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "proxy-fid": fid, "proxy-acc": acc}))
            os.replace(tmp, marker)
        curve.append(json.loads(marker.read_text()))
    return {"run_url": run_url, "run_id": out["run_id"], "curve": curve, "train_seconds": round(train_seconds, 2),
            "config": cfg.to_dict()}


def _structure_eval(root: Path, sc: Scale, ds_url: str, aes: dict) -> dict:
    """A second, blur-robust scorer: the proxy classifier trained at half the resolution (16 px at 32 px), so its
    features describe object shape and colour rather than fine texture. Scores the saved samples of every
    checkpoint and each AE's own reconstructions (the floor). Added after the full-resolution proxy turned out
    unable to recognise even the AEs' reconstructions (accuracy at chance; see RESULTS-small.md in git history)."""
    import numpy as np

    from dcae15.metrics.proxy import ProxyConfig, proxy_extractor
    from dcae15.metrics.reference import load_reference, reference_stats
    from experiments.generation import checkpoint_proxy_fid, proxy_class_accuracy
    from experiments.recon import ProxyPerceptual, reconstruct_grid
    from storage.shards import open_dataset

    cfg = ProxyConfig(resolution=max(8, sc.resolution // 2), width=sc.proxy_width, epochs=sc.proxy_epochs)
    spec = proxy_extractor(ds_url, cfg, cache_url=str(root / "eval"), verbose=True)
    ref = load_reference(reference_stats(ds_url, sc.resolution, spec, cache_url=str(root / "eval")))
    classifier = ProxyPerceptual(spec).net
    ds = open_dataset(ds_url)
    images, labels, valid = ds.read_range(0, min(ds.num_samples, sc.eval_samples), sc.resolution)
    keep = np.asarray(valid, bool)
    images, labels = images[keep], np.asarray(labels)[keep]
    floor = {"real": {"fid": checkpoint_proxy_fid(images, ref, spec),
                      "acc": proxy_class_accuracy(images, labels, classifier)}}
    for kind, ae in aes.items():
        from dcae15.ae.model import StructuredAutoencoder

        c = StructuredAutoencoder.from_pretrained(ae["model_url"]).latent_channels
        recon = np.concatenate([reconstruct_grid(ae["model_url"], images[a:a + 256], c)
                                for a in range(0, len(images), 256)])
        floor[kind] = {"fid": checkpoint_proxy_fid(recon, ref, spec),
                       "acc": proxy_class_accuracy(recon, labels, classifier)}
    curves = {}
    for kind, adt, seed in _variants(sc.seeds):
        name = variant_name(kind, adt, seed)
        pts = []
        for f in sorted((root / "eval" / "gen" / name).glob("samples-*.npz")):
            if int(f.stem.split("-")[1]) > sc.dit_steps:
                continue
            d = np.load(f)
            pts.append({"step": int(f.stem.split("-")[1]), "fid": checkpoint_proxy_fid(d["images"], ref, spec),
                        "acc": proxy_class_accuracy(d["images"], d["labels"], classifier)})
        curves[name] = pts
    return {"extractor_label": spec.label, "resolution": cfg.resolution, **dict(spec.info), "floor": floor,
            "curves": curves, "dit_steps": sc.dit_steps, "seeds": list(sc.seeds)}


def _stages(root: Path) -> Stages:
    return Stages(root)


def _ds_url(root: Path) -> str:
    return _stages(root).get("data")["result"]["url"]


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run(root: Path, sc: Scale, *, scale_name: str, data: str | None = None, ae_seed: int = 0, threads: int = 1,
        results_dir: Path | None = None, command: str = "", tag: str | None = None) -> dict:
    """Run (or continue) every stage under ``root``; write the report; return the report's summary."""
    import torch

    torch.set_num_threads(threads)
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root)
    t_start = time.perf_counter()
    ds = stages.run("data", lambda: _data(root, sc, data))
    stages.run("proxy", lambda: _proxy(root, sc, ds["url"]))
    aes = {k: stages.run(f"ae-{k}", lambda k=k: _ae(root, sc, ds["url"], k, ae_seed)) for k in AE_KINDS}

    def recon_ok(r: dict) -> bool:  # made with this scale's fine-tune list
        return sorted(x["channels"] for x in r["finetuned"]) == sorted(_ft_channels(sc, r["latent_channels"]))

    for k in AE_KINDS:
        stages.run(f"recon-{k}", lambda k=k: _recon(root, sc, ds["url"], k, aes[k], ae_seed), valid=recon_ok)
    stores = {k: stages.run(f"encode-{k}", lambda k=k: _encode(root, sc, ds["url"], aes[k])) for k in AE_KINDS}
    for k in AE_KINDS:
        stages.run(f"floor-{k}", lambda k=k: _floor(root, sc, ds["url"], aes[k]))
    channels = stages.get("recon-structured")["result"]["channel_choices"]
    for kind, adt, seed in _variants(sc.seeds):
        stages.run(f"dit-{variant_name(kind, adt, seed)}",
                   lambda kind=kind, adt=adt, seed=seed: _dit(root, sc, stores[kind], kind, adt, seed, channels,
                                                              threads),
                   valid=lambda r: r["config"]["steps"] == sc.dit_steps)
    # extra AE seeds (Figure 3 / Table 1 spread) after the diffusion runs: the Table 5 part comes first
    for a in sc.ae_seeds:
        if a == ae_seed:
            continue
        for k in AE_KINDS:
            ae_a = stages.run(f"ae-{k}-a{a}", lambda k=k, a=a: _ae(root, sc, ds["url"], k, a, f"{k}-a{a}"))
            stages.run(f"recon-{k}-a{a}", lambda k=k, a=a, ae_a=ae_a: _recon(root, sc, ds["url"], k, ae_a, a,
                                                                              f"{k}-a{a}"), valid=recon_ok)
    if sc.structure_eval:
        stages.run("structure-eval", lambda: _structure_eval(root, sc, ds["url"], aes),
                   valid=lambda r: r.get("dit_steps") == sc.dit_steps and r.get("seeds") == list(sc.seeds))
    from experiments.report import write_report

    mine = {f"dit-{variant_name(k, a, s)}" for k, a, s in _variants(sc.seeds)}
    shown = {k: v for k, v in stages.all().items() if (not k.startswith("dit-") or k in mine)
             and (k != "structure-eval" or sc.structure_eval)}
    session = {"command": command, "scale": scale_name, "tag": tag or scale_name, "scale_config": _jsonable(dataclasses.asdict(sc)),
               "this_invocation_seconds": round(time.perf_counter() - t_start, 1), "ae_seed": ae_seed,
               "threads": threads, "machine": machine_description(),
               "default_scale": DEFAULT_SCALE}
    return write_report(root, shown, session, results_dir or (root / "report"))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def machine_description() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (none was lent to this task)"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
            f"Python {platform.python_version()}, torch {torch.__version__}, {gpu}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path, help="output folder (rerun with the same root to continue)")
    ap.add_argument("--data", default=None, help="image folder <class>/<img> (default: generated shapes dataset)")
    ap.add_argument("--scale", default=DEFAULT_SCALE, choices=sorted(SCALES), help="budget preset (see SCALES)")
    ap.add_argument("--seeds", default=None, type=lambda s: tuple(int(v) for v in s.split(",")),
                    help="diffusion seeds, comma separated (default: the scale's)")
    ap.add_argument("--dit-steps", type=int, default=None,
                    help="diffusion steps (default: the scale's); more steps on an existing root continue the runs")
    ap.add_argument("--tag", default=None, help="names the report RESULTS-<tag>.md (default: the scale)")
    ap.add_argument("--ae-seed", type=int, default=0, help="seed of both autoencoders")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: tiny models run 10-50x slower with 2 on a busy 2-core machine)")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="where RESULTS(.md) and figures/ go (default <root>/report)")
    args = ap.parse_args(argv)
    sc = SCALES[args.scale]
    if args.seeds is not None:
        sc = dataclasses.replace(sc, seeds=args.seeds)
    if args.dit_steps is not None:
        sc = dataclasses.replace(sc, dit_steps=args.dit_steps)
    command = ".venv/bin/python -m experiments.replicate " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    summary = run(args.root, sc, scale_name=args.scale, data=args.data, ae_seed=args.ae_seed, threads=args.threads,
                  results_dir=args.results_dir, command=command, tag=args.tag)
    print(json.dumps(summary["verdicts"], indent=1))
    return summary


if __name__ == "__main__":
    main()
