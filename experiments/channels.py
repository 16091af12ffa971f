"""Issue 21: DC-AE 1.5 where its claim lives — many latent channels, on real images (Fashion-MNIST).

Run from the repository root (two workers share the machine's two cores; a rerun skips finished runs):

    .venv/bin/python -m experiments.channels --root /work/exp21 --worker 0 --workers 2 &
    .venv/bin/python -m experiments.channels --root /work/exp21 --worker 1 --workers 2 &
    wait; .venv/bin/python -m experiments.channels --root /work/exp21 --report-only --results-dir experiments

Stages (every run is a marker ``<root>/stages/<name>.json`` written last; each stage's result is usable alone):

1. fig1b   plain AEs ``f4c{c}`` for the channel sweep (identical budgets), their full-channel PSNR / proxy-rFID,
           latent stores, and the same diffusion backbone and budget on each store, 3 seeds: does generation get
           worse while reconstruction gets better (paper §3.1, Figure 1b)?
2. fig2    structured AEs (Eq. 1, c' list by the paper's rule) at every c, for the channel-wise average latents
           and the reconstructions from the first c' channels (Figure 2; drawn by the report).
3. table5  at the largest c: plain vs SLS vs ADT vs SLS + ADT, 3 diffusion seeds x 2 AE seeds per kind.
4. table1  at the largest c: plain and structured AEs at longer budgets (``t1_ae_steps``): the budget at which the
           structured AE's full-channel PSNR comes within 0.5 dB of the plain one's (Table 1), measured, not assumed.

Work is split between ``--workers`` processes by a fixed round-robin over each stage's run list; a run that needs
another run's output (an AE, a store) reads its marker or, if that run has not started, does it itself: every
marker is written under an exclusive file lock, so the two never do the same run twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from experiments import replicate as R
from experiments.channels_plan import (CLAIMS, STAGES, SWEEPS, TARGETS, Sweep, ae_name, eval_channels,
                                       paper_channel_choices)

__all__ = ["CLAIMS", "TARGETS", "Sweep", "SWEEPS", "paper_channel_choices", "sweep_preset", "jobs", "run_worker", "main"]


def sweep_preset(c: int) -> str:
    """Register (once per process) and name the sweep's AE: ``tiny-f4c8``'s architecture with ``c`` latent
    channels and the paper's c' list. The saved AE carries its own config, so only training needs the name."""
    from dcae15.ae.model import AE_PRESETS

    name = f"sweep-f4c{c}"
    if name not in AE_PRESETS:
        AE_PRESETS[name] = dataclasses.replace(AE_PRESETS["tiny-f4c8"], name=name, latent_channels=c,
                                               channel_choices=paper_channel_choices(c))
    return name


# ---------------------------------------------------------------------------------------------------------------
# Markers claimed with the artifact lease (two worker processes share one root)
# ---------------------------------------------------------------------------------------------------------------


class LockedStages(R.Stages):
    """``R.Stages`` whose ``run`` holds the stage's lease (``storage.lease``, the project's one claim mechanism)
    while it computes: a second process asking for the same stage waits for the first and then reads its marker; a
    killed worker's stage is taken over (at once on this host, else when its lease expires)."""

    def run(self, name: str, fn: Callable[[], Any], valid: Callable[[Any], bool] | None = None) -> Any:
        from storage.lease import claim

        done = self.get(name)
        if done is not None and (valid is None or valid(done["result"])):
            return done["result"]
        with claim(str(self.dir / name), what="experiment stage"):
            return super().run(name, fn, valid)  # re-reads the marker the other process may have written


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def _data(root: Path, sw: Sweep, fmnist_dir: str) -> dict:
    from experiments.fashion_mnist import write_class_folders
    from storage.packing import pack_image_folder

    src = root / "src" / "fashion-mnist"
    info = write_class_folders(src, per_class=sw.per_class, folder=fmnist_dir, size=sw.scale.resolution)
    dst = root / "data" / "fashion-mnist"
    ds = pack_image_folder(str(src), str(dst), name="fashion-mnist", progress=False)
    return {"url": str(dst), "source": str(src), "num_samples": int(getattr(ds, "num_samples", 0) or 0), **info}


def _scale_for(sw: Sweep, c: int) -> R.Scale:
    return dataclasses.replace(sw.scale, ae_preset=sweep_preset(c))


def _recon(root: Path, sw: Sweep, ds_url: str, ae: dict, channels: tuple[int, ...]) -> dict:
    """PSNR / SSIM / proxy-rFID of the reconstructions from the first c' channels (no fine-tune)."""
    from dcae15.ae.recon_eval import ReconEvalConfig, evaluate_reconstruction

    rows = evaluate_reconstruction(ae["model_url"], ds_url, None,
                                   ReconEvalConfig(resolution=sw.scale.resolution, num_images=sw.recon_images,
                                                   channels=channels, lpips_net=None, device="cpu"),
                                   extractor=R._extractor(root, sw.scale, ds_url), print_table=False)
    keep = ("channels", "num_images", "psnr", "ssim", "proxy-rfid")
    return {"rows": [{k: r[k] for k in keep if k in r} for r in rows]}


class Worker:
    """The run functions of one process; each dependency goes through a marker (read, wait, or compute)."""

    def __init__(self, root: Path, sw: Sweep, fmnist_dir: str, threads: int) -> None:
        self.root, self.sw, self.fmnist_dir, self.threads = root, sw, fmnist_dir, threads
        self.stages = LockedStages(root)

    def data(self) -> dict:
        return self.stages.run("data", lambda: _data(self.root, self.sw, self.fmnist_dir))

    def proxy(self) -> dict:
        ds = self.data()
        return self.stages.run("proxy", lambda: R._proxy(self.root, self.sw.scale, ds["url"]))

    def ae(self, kind: str, c: int, a: int, steps: int | None = None) -> dict:
        ds = self.data()
        self.proxy()
        name = ae_name(kind, c, a, steps)
        scale = _scale_for(self.sw, c) if steps is None else dataclasses.replace(_scale_for(self.sw, c), ae_steps=steps)
        return self.stages.run(f"ae-{name}", lambda: R._ae(self.root, scale, ds["url"], kind, a, name))

    def recon(self, kind: str, c: int, a: int, steps: int | None = None) -> dict:
        ae = self.ae(kind, c, a, steps)
        return self.stages.run(f"recon-{ae_name(kind, c, a, steps)}",
                               lambda: _recon(self.root, self.sw, self.data()["url"], ae, eval_channels(c)))

    def store(self, kind: str, c: int, a: int) -> dict:
        ae = self.ae(kind, c, a)
        return self.stages.run(f"encode-{ae_name(kind, c, a)}",
                               lambda: R._encode(self.root, self.sw.scale, self.data()["url"], ae))

    def floor(self, kind: str, c: int, a: int) -> dict:
        ae = self.ae(kind, c, a)
        return self.stages.run(f"floor-{ae_name(kind, c, a)}",
                               lambda: R._floor(self.root, self.sw.scale, self.data()["url"], ae))

    def dit(self, kind: str, adt: bool, c: int, a: int, seed: int) -> dict:
        st = self.store(kind, c, a)
        name = f"{ae_name(kind, c, a)}-{'adt' if adt else 'noadt'}-s{seed}"
        sc = self.sw.scale
        return self.stages.run(
            f"dit-{name}", lambda: R._dit(self.root, sc, st, kind, adt, seed, list(paper_channel_choices(c)),
                                          self.threads, name=name),
            valid=lambda r: r["config"]["steps"] == sc.dit_steps)


def jobs(sw: Sweep) -> list[tuple[str, list[tuple[str, Callable[[Worker], Any]]]]]:
    """[(stage, [(run label, fn(worker))])] in the order they run; the stage-1 diffusion runs are seed-major so
    every c has seed 0 before any has seed 1."""
    cs = sw.channels
    fig1b: list = [(f"ae plain c{c}", lambda w, c=c: (w.recon("plain", c, 0), w.store("plain", c, 0),
                                                       w.floor("plain", c, 0))) for c in cs]
    fig1b += [(f"dit plain c{c} s{s}", lambda w, c=c, s=s: w.dit("plain", False, c, 0, s))
              for s in sw.dit_seeds for c in cs]
    fig2 = [(f"ae structured c{c}", lambda w, c=c: w.recon("structured", c, 0)) for c in cs]
    cm = sw.c_max
    t5: list = [(f"ae {k} c{cm} a{a}", lambda w, k=k, a=a: (w.recon(k, cm, a), w.store(k, cm, a), w.floor(k, cm, a)))
                for a in sw.t5_ae_seeds for k in R.AE_KINDS if (k, a) != ("plain", 0)]
    t5 += [(f"dit {k} {'adt' if adt else 'noadt'} c{cm} a{a} s{s}",
            lambda w, k=k, adt=adt, a=a, s=s: w.dit(k, adt, cm, a, s))
           for s in sw.dit_seeds for a in sw.t5_ae_seeds for k in R.AE_KINDS for adt in (False, True)
           if (k, adt, a) != ("plain", False, 0)]
    # shortest budgets first: a run stopped early still leaves the trend's first points
    t1 = [(f"ae {k} c{cm} a0 {n} steps", lambda w, k=k, n=n: w.recon(k, cm, 0, n))
          for n in sorted(sw.t1_ae_steps) for k in R.AE_KINDS]
    return list(zip(STAGES, (fig1b, fig2, t5, t1)))


def run_worker(root: Path, sw: Sweep, *, worker: int, workers: int, fmnist_dir: str, threads: int = 1,
               stages: tuple[str, ...] | None = None) -> None:
    """Do this worker's share (every ``workers``-th run, offset ``worker``) of each stage, in the order of
    ``stages`` (default: fig1b, fig2, table5): ``("table5", "fig1b")`` measures the fix before the sweep."""
    import torch

    by_stage = dict(jobs(sw))
    unknown = [s for s in (stages or ()) if s not in by_stage]
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {unknown}; choose from {sorted(by_stage)}")
    torch.set_num_threads(threads)
    root.mkdir(parents=True, exist_ok=True)
    w = Worker(root, sw, fmnist_dir, threads)
    w.proxy()
    for stage in stages or tuple(by_stage):
        runs = by_stage[stage]
        t0 = time.perf_counter()
        for i, (label, fn) in enumerate(runs):
            if i % workers == worker:
                print(f"[channels w{worker}] {stage}: {label}", flush=True)
                fn(w)
        print(f"[channels w{worker}] {stage} share done in {time.perf_counter() - t0:.0f} s", flush=True)


def check_data(fmnist_dir: str) -> None:
    """Refuse clearly, before any work, when the Fashion-MNIST files are missing."""
    from experiments.fashion_mnist import load_fashion_mnist

    try:
        load_fashion_mnist(fmnist_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"experiments.channels: {e}") from None


def main(argv: list[str] | None = None) -> dict | None:
    from experiments.fashion_mnist import DEFAULT_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path, help="output folder (rerun with the same root to continue)")
    ap.add_argument("--sweep", default="fmnist", choices=sorted(SWEEPS), help="setting (see SWEEPS)")
    ap.add_argument("--fashion-mnist", default=DEFAULT_DIR, help="folder of the Fashion-MNIST idx files")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes sharing this root (one per core)")
    ap.add_argument("--stages", default=None, help="comma-separated stages of fig1b,fig2,table5,table1, run in that order (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="only write the report from the finished markers")
    ap.add_argument("--results-dir", type=Path, default=None, help="where RESULTS.md and figures/ go")
    args = ap.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        raise SystemExit(f"--worker must be in 0..{args.workers - 1}, got {args.worker}")
    sw = SWEEPS[args.sweep]
    if not args.report_only:
        check_data(args.fashion_mnist)
        run_worker(args.root, sw, worker=args.worker, workers=args.workers, fmnist_dir=args.fashion_mnist,
                   threads=args.threads, stages=None if args.stages is None else tuple(args.stages.split(",")))
    if args.results_dir is None:
        return None
    from experiments.channels_report import write_report

    command = ".venv/bin/python -m experiments.channels " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    summary = write_report(args.root, sw, args.sweep, args.results_dir, command=command,
                           machine=R.machine_description())
    print(json.dumps(summary["verdicts"], indent=1))
    return summary


if __name__ == "__main__":
    main()
