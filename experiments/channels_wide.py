"""Issue 32: the channel sweep without its confound — a backbone wider than the token at every c, an independent
judge, CFG 1 beside CFG 2.5, and the paper's recipe knobs (literal c' list, include_full) at the largest c.

Run from the repository root (two workers share the machine's two cores; a rerun skips finished runs):

    .venv/bin/python -m experiments.channels_wide --root /work/exp32 --worker 0 --workers 2 &
    .venv/bin/python -m experiments.channels_wide --root /work/exp32 --worker 1 --workers 2 &
    wait; .venv/bin/python -m experiments.channels_wide --root /work/exp32 --report-only --results-dir experiments
    .venv/bin/python -m experiments.diagnostics --root /work/exp32        # and --root <an old fmnist root>

The decision rules are declared in ``claims-wide.md`` / ``claims_wide.CLAIMS_WIDE`` (committed before any run).
Data, AEs and their budgets are the ``fmnist`` sweep's (``experiments.channels``); every run is a marker
``<root>/stages/<name>.json`` written last. Stages, in their default order:

1. wfig1b   plain AEs c = 8, 16, 32, 64 and the wide backbone on each, 3 diffusion seeds (Figure 1b).
2. wtable5  at c = 64: + ADT, SLS, SLS + ADT with the ``fmnist`` sweep's scaled c' list (Table 5).
3. wrecipe  at c = 64: the paper's recipe — structured AE with c' in {16, 20, ..., 64} and a full-channel pass
            every step (``include_full``), ADT with the same list and ½ (L_full + L_c'): + ADT, SLS, SLS + ADT;
            and AE seed 1 of plain / structured / recipe for Table 1's spread.
4. wtable6  at c = 8: structured AE (c' = 1..8) + ADT vs the plain one of stage 1 (Table 6 on Fashion-MNIST).
5. wold     the old backbone (SiT-tiny, 2x2 patches) on stage 1's stores, seed 0: checkpoints for the head
            diagnostic of the old setting (its own checkpoints are gone) and a check against the old numbers
            (4 runs x ~80 s).

Every diffusion run is three markers: ``dit-<run>`` (train, then CFG 1 samples at all 6 checkpoints scored by the
proxy, as ``experiments.replicate``), ``cfg2.5-<run>`` (checkpoints 200 / 400 / 600 at CFG 2.5, same noise and
labels), ``judge-<run>`` (both sample sets re-scored by the independent judge). Each AE gets ``recon-``,
``encode-``, ``floor-`` (proxy) and ``jfloor-`` (judge) markers. The judge trains once (``judge`` marker) on its own
2000 images per class.

Cost of ``fmnist-wide`` (``--time-probe`` measures the per-step and per-evaluation numbers below). Measured twice on
2026-12-05 on this 2-core machine shared with six other sessions (load average 6-10, one torch thread), so the
two probes differ by up to 1.7x; the old backbone's 600 steps + 3 evaluations measured 82-93 s here against the
old sweep's 71-86 s per run on an idle machine (RESULTS.md), i.e. these numbers are near idle speed:

    SiT-tiny, batch 64, 8x8xc latents       c = 64                    c = 8
      old p = 2 (16 tokens), train step     84 / 104 ms               61 / 100 ms
      old eval (256, Heun 16, CFG 2.5)      10.6 / 10.1 s             4.9 / 10.1 s
      new p = 1 (64 tokens), train step     603 / 370 ms              481 / 348 ms
      new eval Heun 8, CFG 1                12.2 / 8.9 s              6.0 / 8.0 s
      new eval Heun 8, CFG 2.5              29.7 / 29.8 s             28.5 / 18.3 s

    one wide run = 600 x step + 6 x CFG-1 eval + 3 x CFG-2.5 eval + ~50 s (decode, 2 judges, checkpoints;
                   the old runs spent ~25 s beyond the same compute)
                 = c = 64: 361 + 73 + 89 + 50 ~ 575 s (probe 1),  222 + 53 + 89 + 50 ~ 415 s (probe 2)
                   c = 8:  289 + 36 + 85 + 50 ~ 460 s,             209 + 48 + 55 + 50 ~ 360 s
    runs         = 21 at c = 64, 3 + 3 at c = 16 / 32, 6 at c = 8 (+ 4 old-backbone runs, ~80 s each)
                 -> 13 500 (probe 2) .. 17 800 (probe 1) core-seconds
    AEs etc.     = 7 x ~60 s + 3 recipe AEs x ~90 s (include_full: 2 decoder passes) + recon / encode / floors
                   ~250 s + proxy ~60 s + judge ~450 s (16 000 images x 8 epochs, width 32: 878 s wall here at
                   ~50 % of a core)  ~ 1 500 s
    total        ~ 15 300 .. 19 600 core-seconds = 2.1 .. 2.7 h on 2 cores (two workers)
    per stage    (probe 1 .. probe 2) wfig1b 55 .. 42 min, wtable5 45 .. 33 min, wrecipe 46 .. 34 min,
                 wtable6 12 .. 9 min, wold ~3 min

So the whole plan is at or up to ~40 min over the issue's 2 h: the stages run in order of what decides the confound
(Figure 1b, then Table 5, then the recipe, then Table 6); a stop at 2 h leaves at least the first two and most of
the recipe, and a rerun with the same root continues. The training step dominates (64 tokens instead of 16: the
price of a head wider than the token with the same backbone at every c).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dcae15.metrics.proxy import ProxyConfig
from experiments import channels as C
from experiments import replicate as R
from experiments.claims_wide import reading_key, run_name
from experiments.diagnostics import backbone_hidden

__all__ = ["WideSweep", "WIDE_SWEEPS", "JUDGE", "ADT_TAGS", "recipe_channels", "recipe_preset", "backbone_hidden",
           "jobs", "time_probe", "run_worker", "evaluate_root", "main"]

#: The independent judge: the proxy classifier's network without the rotation / blur / noise augmentations, wider
#: features (4 x 32 = 128-d). Trained on its own Fashion-MNIST set (``WideSweep.judge_per_class``; 80 %),
#: accuracy on the other 20 %; its reference statistics are the sweep's images, as the proxy's.
JUDGE = ProxyConfig(resolution=32, width=32, epochs=8, blur=0.0, noise=0.0, rotate=False)

#: adt tag of a run name -> (ADT on, the c' list rule, include_full)
ADT_TAGS = {"noadt": (False, "scaled", False), "adt": (True, "scaled", False), "adtfull": (True, "literal", True)}


def recipe_channels(c: int) -> tuple[int, ...]:
    """The paper's literal c' list {16, 20, ..., c} (``dcae15.diffusion.adt.default_channel_list``)."""
    from dcae15.diffusion.adt import default_channel_list

    return tuple(default_channel_list(c))


def recipe_preset(c: int) -> str:
    """Register (once per process) and name the recipe AE: ``sweep-f4c{c}`` with the literal c' list."""
    from dcae15.ae.model import AE_PRESETS

    name = f"sweep-f4c{c}-literal"
    if name not in AE_PRESETS:
        AE_PRESETS[name] = dataclasses.replace(AE_PRESETS[C.sweep_preset(c)], name=name,
                                               channel_choices=recipe_channels(c))
    return name


@dataclass(frozen=True, kw_only=True)
class WideSweep:
    """One setting of issue 32: the ``fmnist`` sweep's data / AEs / budgets (``sweep``) with a backbone wider than
    the token at every c, extra CFG scales, the judge, and the recipe and Table 6 variants."""

    sweep: C.Sweep
    extra_cfg: tuple[float, ...] = (2.5,)
    """CFG scales sampled beside ``sweep.scale.cfg_scale`` (the primary one, at every checkpoint) from the same
    checkpoints with the same noise and labels."""
    extra_eval_every: int = 200
    """The extra CFG scales are scored at the checkpoints that are multiples of this (the old sweep's grid: CFG 2.5
    costs 2.4x CFG 1's sampling; see the module docstring)."""
    judge: ProxyConfig = field(default_factory=lambda: JUDGE)
    judge_per_class: int = 2000
    """Fashion-MNIST training images per class the judge learns from (its own set: the first ``judge_per_class``
    of each class; 0 = the sweep's images). Measured: 600 per class tops out at 0.877 (width 16) / 0.876 (width 32)
    held out; 2000 per class, width 32, 8 epochs: 0.924 held out (4000 images), 0.919 on the t10k split."""
    t1_ae_seeds: tuple[int, ...] = (0, 1)
    """AE seeds of the Table 1 comparison (plain / structured / recipe at the largest c)."""
    small_c: int = 8
    """Table 6's c (structured AE with the scaled list 1..c, + ADT, against stage 1's plain model)."""
    min_eval_points: int = 6
    old_scale: R.Scale = field(default_factory=lambda: C.SWEEPS["fmnist"].scale)
    """The old setting's scale (its backbone: SiT-tiny on 2x2 patches), for the ``wold`` stage."""

    def __post_init__(self) -> None:
        sc = self.sweep.scale
        h = backbone_hidden(sc)
        narrow = [c for c in (*self.sweep.channels, self.small_c) if sc.dit_patch ** 2 * c >= h]
        if narrow:
            raise ValueError(f"WideSweep: backbone hidden width {h} must exceed the token dimension p²c = "
                             f"{sc.dit_patch}² x c at every c; not at c = {narrow}")
        points = sc.dit_steps // sc.eval_every
        if points < self.min_eval_points:
            raise ValueError(f"WideSweep: {points} evaluation points per run (dit_steps {sc.dit_steps} / eval_every "
                             f"{sc.eval_every}); need >= {self.min_eval_points}")
        from experiments.claims_wide import READINGS

        needed = {g for _, g in READINGS}
        if sc.cfg_scale in self.extra_cfg or not needed <= set(self.cfg_scales):
            raise ValueError(f"WideSweep: CFG scales {sc.cfg_scale} (every checkpoint) + {self.extra_cfg} must be "
                             f"distinct and cover the rules' readings {sorted(needed)}")
        if self.small_c not in self.sweep.channels:
            raise ValueError(f"WideSweep.small_c={self.small_c} must be one of the sweep's channels "
                             f"{self.sweep.channels} (Table 6 compares against stage 1's plain model)")

    @property
    def cfg_scales(self) -> tuple[float, ...]:
        return (self.sweep.scale.cfg_scale, *self.extra_cfg)


# fmnist's scale with SiT-tiny on 1x1 patches: 64 tokens of c numbers; hidden 96 > c at every c <= 64.
# CFG 1 (primary) at 6 points (every 100 of 600 steps), CFG 2.5 at 200 / 400 / 600 (the old grid); Heun 8 steps
# (the demo's) to pay for the extra sampling.
_WIDE_SCALE = dataclasses.replace(C.SWEEPS["fmnist"].scale, dit_patch=1, eval_every=100, sample_steps=8, cfg_scale=1.0)

WIDE_SWEEPS: dict[str, WideSweep] = {
    "fmnist-wide": WideSweep(sweep=dataclasses.replace(C.SWEEPS["fmnist"], scale=_WIDE_SCALE)),
    # seconds: the test's setting (numbers meaningless), the same code path; c' recipe list needs c > 16
    "smoke-wide": WideSweep(
        sweep=dataclasses.replace(C.SWEEPS["smoke"], channels=(4, 20), t1_ae_steps=(),
                                  scale=dataclasses.replace(C.SWEEPS["smoke"].scale, dit_patch=1, eval_every=2,
                                                            cfg_scale=1.0)),
        judge=dataclasses.replace(JUDGE, width=4, epochs=1), judge_per_class=4, extra_eval_every=2, t1_ae_seeds=(0, 1),
        small_c=4, min_eval_points=2, old_scale=C.SWEEPS["smoke"].scale),
}



# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def _eval_cfg(root: Path, sc: R.Scale, dit: dict, name: str, cfg_scale: float, every: int) -> dict:
    """Sample the checkpoints of a finished run that are multiples of ``every`` at ``cfg_scale`` (the same noise
    and labels as the main evaluation), score with the proxy, keep the samples for the judge. Cached per
    checkpoint."""
    import numpy as np

    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.diffusion.checkpoint import list_checkpoints, read_run_config
    from dcae15.metrics.reference import load_reference
    from experiments.generation import checkpoint_proxy_fid, proxy_class_accuracy, sample_images
    from experiments.recon import ProxyPerceptual
    from storage.latent_store import LatentStore

    st = LatentStore.open(read_run_config(dit["run_url"])["store_url"])
    ae = StructuredAutoencoder.from_pretrained(st.attrs["ae_url"]).eval()
    spec = R._extractor(root, sc, R._ds_url(root))
    classifier = ProxyPerceptual(spec).net
    ref = load_reference(R._stages(root).get("proxy")["result"]["reference_url"])
    eval_dir = root / "eval" / "gen" / f"{name}-cfg{cfg_scale:g}"
    eval_dir.mkdir(parents=True, exist_ok=True)
    curve = []
    for step in list_checkpoints(dit["run_url"]):
        if step > sc.dit_steps or step % every:
            continue
        marker, saved = eval_dir / f"step-{step:07d}.json", eval_dir / f"samples-{step:07d}.npz"
        if not marker.exists() or not saved.exists():
            images, labels = sample_images(dit["run_url"], step, ae=ae, scaling_factor=float(st.scaling_factor),
                                           num_samples=sc.eval_samples, seed=10_000, sampler=sc.sampler,
                                           sample_steps=sc.sample_steps, cfg_scale=cfg_scale)
            with open(saved.with_suffix(".tmp"), "wb") as f:
                np.savez(f, images=images, labels=labels)
            os.replace(saved.with_suffix(".tmp"), saved)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "proxy-fid": checkpoint_proxy_fid(images, ref, spec),
                                       "proxy-acc": proxy_class_accuracy(images, labels, classifier)}))
            os.replace(tmp, marker)
        curve.append(json.loads(marker.read_text()))
    return {"cfg_scale": cfg_scale, "curve": curve, "eval_dir": str(eval_dir)}


def _judge_spec(root: Path, ws: WideSweep):
    """The trained judge (loaded from its cache; the ``judge`` marker names its training set)."""
    from dcae15.metrics.proxy import proxy_extractor

    return proxy_extractor(R._stages(root).get("judge")["result"]["train_url"], ws.judge,
                           cache_url=str(root / "eval"))


def _judge(root: Path, ws: WideSweep, ds_url: str, fmnist_dir: str) -> dict:
    """Train (or load) the judge on its own Fashion-MNIST set; reference statistics on the sweep's images."""
    from dcae15.metrics.proxy import proxy_extractor
    from dcae15.metrics.reference import reference_stats
    from experiments.fashion_mnist import write_class_folders
    from storage.packing import pack_image_folder

    train_url = ds_url
    if ws.judge_per_class:
        src = root / "src" / "fashion-mnist-judge"
        write_class_folders(src, per_class=ws.judge_per_class, folder=fmnist_dir, size=ws.sweep.scale.resolution)
        train_url = str(root / "data" / "fashion-mnist-judge")
        pack_image_folder(str(src), train_url, name="fashion-mnist-judge", progress=False)
    spec = proxy_extractor(train_url, ws.judge, cache_url=str(root / "eval"), verbose=True)
    ref = reference_stats(ds_url, ws.sweep.scale.resolution, spec, cache_url=str(root / "eval"))
    return {"reference_url": ref, "extractor_label": spec.label, "config": dataclasses.asdict(ws.judge),
            "train_url": train_url, "per_class": ws.judge_per_class, **dict(spec.info)}


def _judge_run(root: Path, ws: WideSweep, name: str, dit: dict, extra: dict[float, dict]) -> dict:
    """Re-score every saved sample set of a run (all CFG scales) with the judge; all four readings' curves and
    the run's head shape (for the head-width rule)."""
    import numpy as np

    from dcae15.diffusion.checkpoint import read_run_config
    from dcae15.metrics.reference import load_reference
    from experiments.generation import checkpoint_proxy_fid, proxy_class_accuracy
    from experiments.recon import ProxyPerceptual

    sc = ws.sweep.scale
    spec = _judge_spec(root, ws)
    net = ProxyPerceptual(spec).net
    ref = load_reference(R._stages(root).get("judge")["result"]["reference_url"])
    dirs = {sc.cfg_scale: root / "eval" / "gen" / name, **{g: Path(e["eval_dir"]) for g, e in extra.items()}}
    curves = {reading_key("proxy", sc.cfg_scale): [{"step": p["step"], "fid": p["proxy-fid"], "acc": p["proxy-acc"]}
                                                   for p in dit["curve"]]}
    for g, e in extra.items():
        curves[reading_key("proxy", g)] = [{"step": p["step"], "fid": p["proxy-fid"], "acc": p["proxy-acc"]}
                                           for p in e["curve"]]
    for g, d in dirs.items():
        pts = []
        for f in sorted(d.glob("samples-*.npz")):
            step = int(f.stem.split("-")[1])
            if step > sc.dit_steps:
                continue
            z = np.load(f)
            pts.append({"step": step, "fid": checkpoint_proxy_fid(z["images"], ref, spec),
                        "acc": proxy_class_accuracy(z["images"], z["labels"], net)})
        curves[reading_key("judge", g)] = pts
    mc = read_run_config(dit["run_url"])["model_config"]
    return {"curves": curves, "head": {"hidden": int(mc["hidden"]), "patch": int(mc["patch_size"]),
                                       "channels": int(mc["in_channels"])}, "dit_steps": sc.dit_steps}


def _judge_floor(root: Path, ws: WideSweep, ds_url: str, ae: dict) -> dict:
    """The judge's FID / accuracy of the AE's reconstructions (and of the real images): the floor a perfect
    diffusion model on this AE would reach, as the judge sees it."""
    import numpy as np

    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.metrics.reference import load_reference
    from experiments.generation import checkpoint_proxy_fid, proxy_class_accuracy
    from experiments.recon import ProxyPerceptual, reconstruct_grid
    from storage.shards import open_dataset

    sc = ws.sweep.scale
    ds = open_dataset(ds_url)
    images, labels, valid = ds.read_range(0, min(ds.num_samples, sc.eval_samples), sc.resolution)
    keep = np.asarray(valid, bool)
    images, labels = images[keep], np.asarray(labels)[keep]
    c = StructuredAutoencoder.from_pretrained(ae["model_url"]).latent_channels
    recon = np.concatenate([reconstruct_grid(ae["model_url"], images[a:a + 256], c)
                            for a in range(0, len(images), 256)])
    spec = _judge_spec(root, ws)
    net = ProxyPerceptual(spec).net
    ref = load_reference(R._stages(root).get("judge")["result"]["reference_url"])
    return {"reconstruction_judge_fid": checkpoint_proxy_fid(recon, ref, spec),
            "real_images_judge_fid": checkpoint_proxy_fid(images, ref, spec),
            "reconstruction_judge_acc": proxy_class_accuracy(recon, labels, net),
            "real_images_judge_acc": proxy_class_accuracy(images, labels, net), "num_images": int(len(images))}


class WideWorker(C.Worker):
    """``experiments.channels.Worker`` plus the recipe AE kind, the judge, and the three-marker diffusion runs."""

    def __init__(self, root: Path, ws: WideSweep, fmnist_dir: str, threads: int) -> None:
        super().__init__(root, ws.sweep, fmnist_dir, threads)
        self.ws = ws

    def ae(self, kind: str, c: int, a: int, steps: int | None = None) -> dict:
        if kind != "recipe":
            return super().ae(kind, c, a, steps)
        ds = self.data()
        self.proxy()
        name = C.ae_name(kind, c, a, steps)
        sc = dataclasses.replace(self.sw.scale, ae_preset=recipe_preset(c),
                                 **({} if steps is None else {"ae_steps": steps}))
        return self.stages.run(f"ae-{name}", lambda: R._ae(self.root, sc, ds["url"], kind, a, name,
                                                           include_full=True))

    def judge(self) -> dict:
        ds = self.data()
        return self.stages.run("judge", lambda: _judge(self.root, self.ws, ds["url"], self.fmnist_dir))

    def judge_floor(self, kind: str, c: int, a: int) -> dict:
        ae = self.ae(kind, c, a)
        self.judge()
        return self.stages.run(f"jfloor-{C.ae_name(kind, c, a)}",
                               lambda: _judge_floor(self.root, self.ws, self.data()["url"], ae))

    def prep(self, kind: str, c: int, a: int) -> None:
        """Everything an AE of a diffusion run needs, its reconstruction numbers and proxy floor (the judge's
        floor is a job of its own at the end of the stage: the judge trains while the other worker trains)."""
        self.recon(kind, c, a)
        self.store(kind, c, a)
        self.floor(kind, c, a)

    def wdit(self, kind: str, adt: str, c: int, seed: int) -> dict:
        """One diffusion run: train + CFG-main proxy curve, the extra-CFG curves, the judge's re-scoring."""
        enabled, rule, include_full = ADT_TAGS[adt]
        st = self.store(kind, c, 0)
        name = run_name(kind, c, 0, adt, seed)
        sc = self.sw.scale
        chans = list(C.paper_channel_choices(c) if rule == "scaled" else recipe_channels(c))
        steps_ok = lambda r: r["config"]["steps"] == sc.dit_steps  # noqa: E731
        dit = self.stages.run(f"dit-{name}", lambda: R._dit(self.root, sc, st, kind, enabled, seed, chans,
                                                            self.threads, name=name, include_full=include_full),
                              valid=steps_ok)
        extra = {g: self.stages.run(f"cfg{g:g}-{name}", lambda g=g: _eval_cfg(self.root, sc, dit, name, g,
                                                                          self.ws.extra_eval_every),
                                    valid=lambda r: r["curve"] and r["curve"][-1]["step"] == sc.dit_steps)
                 for g in self.ws.extra_cfg}
        self.judge()
        return self.stages.run(f"judge-{name}", lambda: _judge_run(self.root, self.ws, name, dit, extra),
                               valid=lambda r: r.get("dit_steps") == sc.dit_steps)


    def old_dit(self, c: int) -> dict:
        """The old ``fmnist`` backbone (SiT-tiny on 2x2 patches) on this root's plain c store, seed 0: checkpoints
        for the head diagnostic (``experiments.diagnostics``) and a reproduction of the old sweep's numbers."""
        st = self.store("plain", c, 0)
        sc = self.ws.old_scale
        name = f"old-p2-{C.ae_name('plain', c, 0)}-s0"
        return self.stages.run(f"dit-{name}", lambda: R._dit(self.root, sc, st, "plain", False, 0,
                                                             list(C.paper_channel_choices(c)), self.threads, name=name),
                               valid=lambda r: r["config"]["steps"] == sc.dit_steps)


def jobs(ws: WideSweep) -> list[tuple[str, list[tuple[str, Callable[[WideWorker], Any]]]]]:
    """[(stage, [(run label, fn(worker))])] in the order they run; diffusion runs seed-major (every variant has
    seed 0 before any has seed 1)."""
    sw = ws.sweep
    cs, cm, seeds = sw.channels, sw.c_max, sw.dit_seeds

    def prep(kind: str, c: int, a: int = 0) -> tuple[str, Callable]:
        return f"ae {kind} c{c} a{a}", lambda w: w.prep(kind, c, a)

    def jfloor(kind: str, c: int, a: int = 0) -> tuple[str, Callable]:
        return f"judge floor {kind} c{c} a{a}", lambda w: w.judge_floor(kind, c, a)

    def dit(kind: str, adt: str, c: int, s: int) -> tuple[str, Callable]:
        return f"dit {run_name(kind, c, 0, adt, s)}", lambda w: w.wdit(kind, adt, c, s)

    wfig1b = [prep("plain", c) for c in cs] + [dit("plain", "noadt", c, s) for s in seeds for c in cs]
    wfig1b += [jfloor("plain", c) for c in cs]
    t5 = (("plain", "adt"), ("structured", "noadt"), ("structured", "adt"))
    wtable5 = [prep("structured", cm)] + [dit(k, t, cm, s) for s in seeds for k, t in t5]
    wtable5 += [jfloor("structured", cm)]
    wrecipe = [prep("recipe", cm)] + [dit(k, t, cm, s) for s in seeds
                                      for k, t in (("plain", "adtfull"), ("recipe", "noadt"), ("recipe", "adtfull"))]
    wrecipe += [(f"ae {k} c{cm} a{a} (Table 1)", lambda w, k=k, a=a: w.recon(k, cm, a))
                for a in ws.t1_ae_seeds if a != 0 for k in ("plain", "structured", "recipe")]
    wrecipe += [jfloor("recipe", cm)]
    wtable6 = [prep("structured", ws.small_c)] + [dit("structured", "adt", ws.small_c, s) for s in seeds]
    wtable6 += [jfloor("structured", ws.small_c)]
    wold = [(f"old backbone plain c{c} s0", lambda w, c=c: w.old_dit(c)) for c in cs]
    return [("wfig1b", wfig1b), ("wtable5", wtable5), ("wrecipe", wrecipe), ("wtable6", wtable6), ("wold", wold)]


def time_probe(ws: WideSweep, *, steps: int = 12) -> list[dict]:
    """Seconds per training step and per evaluation of the sweep's backbone and of the old ``fmnist`` one (patch 2)
    at the smallest and largest c, on random latents (the numbers in the module docstring)."""
    import torch

    from dcae15.diffusion.objectives import make_objective
    from dcae15.diffusion.samplers import sample_latents
    from dcae15.models.registry import build_model, model_config

    sc, old = ws.sweep.scale, ws.old_scale
    obj = make_objective("flow")
    rows = []
    for label, s in (("old", old), ("new", sc)):
        for c in (min(ws.sweep.channels), ws.sweep.c_max):
            torch.manual_seed(0)
            m = build_model(model_config(s.dit_model, in_channels=c, input_size=(8, 8), num_classes=10,
                                         patch_size=s.dit_patch, **s.dit_overrides))
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            x, y = torch.randn(s.dit_batch, c, 8, 8), torch.randint(10, (s.dit_batch,))

            def step() -> None:
                t, e = torch.rand(len(x)).view(-1, 1, 1, 1), torch.randn_like(x)
                loss = (m((1 - t) * x + t * e, t.flatten(), y) - (e - x)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            row = {"backbone": label, "c": c, "patch": s.dit_patch, "train_step_s": (time.perf_counter() - t0) / steps}
            m.eval()
            for g in sorted({s.cfg_scale, *(ws.extra_cfg if label == "new" else ())}):
                t0 = time.perf_counter()
                with torch.no_grad():
                    sample_latents(m, obj, shape=(s.eval_samples, c, 8, 8), labels=torch.arange(s.eval_samples) % 10,
                                   sampler=s.sampler, steps=s.sample_steps, generator=torch.Generator().manual_seed(0),
                                   null_class=10, cfg_scale=g)
                row[f"eval_cfg{g:g}_s"] = time.perf_counter() - t0
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def run_worker(root: Path, ws: WideSweep, *, worker: int, workers: int, fmnist_dir: str, threads: int = 1,
               stages: tuple[str, ...] | None = None) -> None:
    """Do this worker's share (every ``workers``-th run, offset ``worker``) of each stage, in ``stages``' order."""
    import torch

    by_stage = dict(jobs(ws))
    unknown = [s for s in (stages or ()) if s not in by_stage]
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {unknown}; choose from {list(by_stage)}")
    torch.set_num_threads(threads)
    root.mkdir(parents=True, exist_ok=True)
    w = WideWorker(root, ws, fmnist_dir, threads)
    w.proxy()
    for stage in stages or tuple(by_stage):
        t0 = time.perf_counter()
        for i, (label, fn) in enumerate(by_stage[stage]):
            if i % workers == worker:
                print(f"[wide w{worker}] {stage}: {label}", flush=True)
                fn(w)
        print(f"[wide w{worker}] {stage} share done in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------------------------


def evaluate_root(root: Path, ws: WideSweep) -> dict:
    """The declared rules on the root's finished markers."""
    from experiments.claims_wide import collect, evaluate

    return evaluate(collect(R.Stages(root).all()), channels=ws.sweep.channels, seeds=ws.sweep.dit_seeds,
                    ae_seeds=ws.t1_ae_seeds, small_c=ws.small_c)


def main(argv: list[str] | None = None) -> dict | None:
    from experiments.fashion_mnist import DEFAULT_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path, help="output folder (rerun with the same root to continue)")
    ap.add_argument("--sweep", default="fmnist-wide", choices=sorted(WIDE_SWEEPS), help="setting (see WIDE_SWEEPS)")
    ap.add_argument("--fashion-mnist", default=DEFAULT_DIR, help="folder of the Fashion-MNIST idx files")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes sharing this root (one per core)")
    ap.add_argument("--stages", default=None,
                    help="comma-separated of wfig1b,wtable5,wrecipe,wtable6,wold, run in that order (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="only evaluate the rules on the finished markers")
    ap.add_argument("--results-dir", type=Path, default=None, help="where RESULTS-wide.md goes")
    ap.add_argument("--time-probe", action="store_true", help="only time a few training steps and one evaluation of "
                    "the new and the old backbone (random latents; --root unused)")
    args = ap.parse_args(argv)
    if args.time_probe:
        time_probe(WIDE_SWEEPS[args.sweep])
        return None
    if not 0 <= args.worker < args.workers:
        raise SystemExit(f"--worker must be in 0..{args.workers - 1}, got {args.worker}")
    ws = WIDE_SWEEPS[args.sweep]
    if not args.report_only:
        C.check_data(args.fashion_mnist)
        run_worker(args.root, ws, worker=args.worker, workers=args.workers, fmnist_dir=args.fashion_mnist,
                   threads=args.threads, stages=None if args.stages is None else tuple(args.stages.split(",")))
    verdicts = evaluate_root(args.root, ws)
    if args.results_dir is not None:
        from experiments.channels_wide_report import write_report

        write_report(args.root, ws, args.sweep, args.results_dir, verdicts)
    print(json.dumps({k: v["held"] for k, v in verdicts.items()}, indent=1))
    return verdicts


if __name__ == "__main__":
    main()
