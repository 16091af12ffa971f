"""Issue 21's report: Figure 1b (the channel sweep), Figure 2, Tables 1 / 5 at the largest c, Table 6 (the control).

Everything is read from the run markers under the root; a run that has no marker is listed as "not yet run", never
estimated. The verdicts are ``experiments.channels_plan.CLAIMS`` with ``TARGETS``; this module reads the plan and the
markers only (it never imports the runner, ``experiments.channels``).
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import numpy as np

from experiments import report as RP
from experiments.channels_plan import CLAIMS, TARGETS, ae_name, eval_channels, planned_markers

__all__ = ["collect", "verdicts", "write_report"]


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------


def _ms(vals: list[float]) -> dict:
    v = np.asarray(vals, float)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size), "values": [float(x) for x in v]}


def _pm(d: dict | None, nd: int = 3) -> str:
    return "—" if not d else f"{d['mean']:.{nd}f} ± {d['std']:.{nd}f} (n={d['n']})"


def _curve(stages: dict, name: str, key: str) -> list[tuple[int, float]] | None:
    st = stages.get(f"dit-{name}")
    return None if st is None else sorted((int(p["step"]), float(p[key])) for p in st["result"]["curve"])


def collect(stages: dict, sw: Any) -> dict:
    """Per c: the plain AE's reconstruction rows, its floor, the diffusion curves per seed; structured rows."""
    out: dict[int, dict] = {}
    for c in sw.channels:
        e: dict[str, Any] = {"curves": {}, "acc": {}}
        for kind in ("plain", "structured"):
            r = stages.get(f"recon-{ae_name(kind, c, 0)}")
            e[f"recon_{kind}"] = None if r is None else RP._rows_by_c(r["result"]["rows"])
        f = stages.get(f"floor-{ae_name('plain', c, 0)}")
        e["floor"] = None if f is None else f["result"]
        for s in sw.dit_seeds:
            name = f"{ae_name('plain', c, 0)}-noadt-s{s}"
            fid, acc = _curve(stages, name, "proxy-fid"), _curve(stages, name, "proxy-acc")
            if fid:
                e["curves"][s], e["acc"][s] = fid, acc
        final = sw.scale.dit_steps
        e["final_fid"] = _ms([dict(v)[final] for v in e["curves"].values() if final in dict(v)]) if e["curves"] else None
        e["final_acc"] = _ms([dict(v)[final] for v in e["acc"].values() if final in dict(v)]) if e["acc"] else None
        out[c] = e
    return out


def table1_budget(stages: dict, sw: Any) -> list[dict]:
    """At the largest c, AE seed 0: per AE budget (the sweep's and ``t1_ae_steps``) the plain and structured AEs'
    PSNR at c'= c/8 and c, and the full-channel gap (structured − plain); budgets with both AEs only."""
    hi, out = sw.c_max, []
    for n in sorted({sw.scale.ae_steps, *sw.t1_ae_steps}):
        steps = None if n == sw.scale.ae_steps else n
        rows = {k: stages.get(f"recon-{ae_name(k, hi, 0, steps)}") for k in ("plain", "structured")}
        if all(rows.values()):
            by = {k: RP._rows_by_c(r["result"]["rows"]) for k, r in rows.items()}
            lo = max(1, hi // 8)
            out.append({"steps": n, **{f"{k}_psnr": by[k][hi]["psnr"] for k in by},
                        **{f"{k}_psnr_lo": by[k][lo]["psnr"] for k in by},
                        "gap": by["structured"][hi]["psnr"] - by["plain"][hi]["psnr"],
                        "seconds": sum(stages[f"ae-{ae_name(k, hi, 0, steps)}"]["seconds"] for k in by)})
    return out


def _t1_budget_fig(rows: list[dict], sw: Any, path: Path) -> None:
    """PSNR vs AE budget, plain and structured, full channels and the first c/8."""
    plt = RP._plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    n = [r["steps"] for r in rows]
    for kind, color in (("plain", "tab:blue"), ("structured", "tab:orange")):
        ax.plot(n, [r[f"{kind}_psnr"] for r in rows], "o-", color=color, label=f"{kind}, all c={sw.c_max} channels")
        ax.plot(n, [r[f"{kind}_psnr_lo"] for r in rows], "s:", color=color,
                label=f"{kind}, first c/8={max(1, sw.c_max // 8)}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("AE training steps (batch 32, cosine to 0 at the budget)")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Table 1's budget at c={sw.c_max}: does masking cost full-channel PSNR? (AE seed 0)", fontsize=9)
    RP._save(fig, path)


def _t5_curves(stages: dict, sw: Any, key: str) -> dict:
    """{(kind, adt): {a*1000 + seed: curve}} at the largest c (RP._speed_verdicts's input)."""
    cur: dict = {}
    for kind in ("plain", "structured"):
        for adt in (False, True):
            for a in sw.t5_ae_seeds:
                for s in sw.dit_seeds:
                    pts = _curve(stages, f"{ae_name(kind, sw.c_max, a)}-{'adt' if adt else 'noadt'}-s{s}", key)
                    if pts and pts[-1][0] == sw.scale.dit_steps:
                        cur.setdefault((kind, adt), {})[a * 1000 + s] = pts
    return cur


def verdicts(stages: dict, sw: Any) -> dict[str, dict]:
    """Each claim of ``CLAIMS``: its numbers and ``held`` (True / False / None = not (fully) measured)."""
    col = collect(stages, sw)
    lo, hi = min(sw.channels), sw.c_max
    out: dict[str, dict] = {k: {"claim": v.format(**TARGETS), "held": None} for k, v in CLAIMS.items()}
    rl, rh = col[lo]["recon_plain"], col[hi]["recon_plain"]
    if rl and rh:
        gain = rh[hi]["psnr"] - rl[lo]["psnr"]
        out["fig1b_recon"].update(psnr={c: col[c]["recon_plain"][c]["psnr"] for c in sw.channels
                                        if col[c]["recon_plain"]}, gain_db=gain,
                                  rfid={c: col[c]["recon_plain"][c]["proxy-rfid"] for c in sw.channels
                                        if col[c]["recon_plain"]},
                                  held=bool(gain >= TARGETS["recon_gain_db"]
                                            and rh[hi]["proxy-rfid"] < rl[lo]["proxy-rfid"]))
    fl, fh = col[lo]["final_fid"], col[hi]["final_fid"]
    al, ah = col[lo]["final_acc"], col[hi]["final_acc"]
    if fl and fh and al and ah:
        complete = min(fl["n"], fh["n"]) >= len(sw.dit_seeds)
        worse_fid = fh["mean"] - fl["mean"] > fh["std"] + fl["std"]
        worse_acc = al["mean"] - ah["mean"] > ah["std"] + al["std"]
        out["fig1b_generation"].update(
            final_fid={c: col[c]["final_fid"] for c in sw.channels}, final_acc={c: col[c]["final_acc"] for c in sw.channels},
            fid_worse=bool(worse_fid), acc_worse=bool(worse_acc),
            # context for Table 5 (run at the largest c, fixed before the runs): where the slowdown shows
            slowdown_cs=[c for c in sw.channels if col[c]["final_fid"] and c != lo and col[c]["final_fid"]["mean"]
                         - fl["mean"] > col[c]["final_fid"]["std"] + fl["std"]],
            held=bool(worse_fid and worse_acc) if complete else None,
            reason=None if complete else f"only {min(fl['n'], fh['n'])} of {len(sw.dit_seeds)} seeds finished")
    pairs = []
    for a in sw.t5_ae_seeds:
        p, s_ = (stages.get(f"recon-{ae_name(k, hi, a)}") for k in ("plain", "structured"))
        if p and s_:
            pairs.append(RP._rows_by_c(s_["result"]["rows"])[hi]["psnr"] - RP._rows_by_c(p["result"]["rows"])[hi]["psnr"])
    if pairs:
        gap = _ms(pairs)
        out["table1"].update(gap=gap, held=bool(abs(gap["mean"]) <= TARGETS["full_psnr_gap_db"])
                             if len(pairs) == len(sw.t5_ae_seeds) else None)
    expected = len(sw.t5_ae_seeds) * len(sw.dit_seeds)
    for key, metric, higher in (("proxy-fid", "proxy-FID", False), ("proxy-acc", "class accuracy", True)):
        cur = _t5_curves(stages, sw, key)
        v = RP._speed_verdicts(cur, metric, higher)
        if not v:
            continue
        complete = all(len(cur.get(k, {})) == expected for k in ((p, a) for p in ("plain", "structured")
                                                                  for a in (False, True)))
        sfx = "" if key == "proxy-fid" else "_acc"
        for name in ("table5_speed", "table5_alone"):
            got = dict(v[name])
            if not complete:
                got["held"], got["reason"] = None, (f"incomplete: not every variant has all {expected} runs "
                                                    f"(runs per variant: { {RP._VARIANTS[i][2]: len(cur.get(k[:2], {})) for i, k in enumerate(RP._VARIANTS)} })")
            got["claim_text"] = got.pop("claim")
            out.setdefault(name + sfx, {"claim": CLAIMS[name].format(**TARGETS)}).update(got)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _fig1b(col: dict, sw: Any, path: Path) -> None:
    """Reconstruction vs c next to generation vs c (the paper's Figure 1b at toy scale)."""
    plt = RP._plt()
    cs = [c for c in sw.channels if col[c]["recon_plain"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"wspace": 0.45})
    ax = axes[0]
    ax.plot(cs, [col[c]["recon_plain"][c]["psnr"] for c in cs], "o-", color="tab:blue", label="PSNR (dB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latent channels c (f4, 32 px)")
    ax.set_ylabel("reconstruction PSNR (dB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(cs, [col[c]["recon_plain"][c]["proxy-rfid"] for c in cs], "s--", color="tab:red")
    ax2.set_ylabel("proxy-rFID (lower is better)", color="tab:red")
    ax.set_title("reconstruction (plain AEs)", fontsize=9)
    for ax, key, label in ((axes[1], "final_fid", "final proxy-FID (lower is better)"),
                           (axes[2], "final_acc", "final class accuracy (higher is better)")):
        g = [c for c in sw.channels if col[c][key]]
        mu = np.array([col[c][key]["mean"] for c in g])
        sd = np.array([col[c][key]["std"] for c in g])
        if g:
            ax.errorbar(g, mu, yerr=sd, fmt="o-", capsize=3, color="tab:green")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latent channels c")
        ax.set_ylabel(label)
        ax.set_title(f"generation after {sw.scale.dit_steps} steps (mean ± std over seeds)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].grid(alpha=0.3)
    fig.suptitle("Figure 1b at toy scale (Fashion-MNIST): reconstruction vs generation as the channel count grows",
                 fontsize=9)
    RP._save(fig, path)


def _fig1b_curves(col: dict, sw: Any, path: Path) -> None:
    plt = RP._plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(sw.channels):
        for ax, key in ((axes[0], "curves"), (axes[1], "acc")):
            if not col[c][key]:
                continue
            st, mu, sd = RP._mean_curve(col[c][key])
            color = cmap(i / max(1, len(sw.channels) - 1))
            ax.plot(st, mu, "o-", ms=3, color=color, label=f"c={c} ({len(col[c][key])} seeds)")
            ax.fill_between(st, mu - sd, mu + sd, color=color, alpha=0.15)
    for ax, label in ((axes[0], "proxy-FID (lower is better)"), (axes[1], "class accuracy (higher is better)")):
        ax.set_xlabel("diffusion training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle("Convergence of the same backbone on each plain AE's latents (mean ± std over seeds)", fontsize=9)
    RP._save(fig, path)


def _images(ds_url: str, resolution: int, n: int) -> np.ndarray:
    """The first image of each of the first ``n`` classes (Figure 2's inputs)."""
    from storage.shards import open_dataset

    ds = open_dataset(ds_url)
    images, labels, valid = ds.read_range(0, min(ds.num_samples, 200), resolution)
    keep = np.asarray(valid, bool)
    images, labels = images[keep], np.asarray(labels)[keep]
    pick = [int(np.flatnonzero(labels == k)[0]) for k in sorted(set(labels.tolist()))[:n]]
    return images[pick]


def _fig2(stages: dict, sw: Any, ds_url: str, path_latent: Path, path_recon: Path, n: int = 4) -> bool:
    """Figure 2: the channel-wise average latent per image for every (c, kind); and the reconstructions from the
    first c/8, c/4, c/2, c channels."""
    import torch

    from dcae15.ae.model import StructuredAutoencoder
    from experiments.recon import reconstruct_grid

    images = _images(ds_url, sw.scale.resolution, n)
    rows = []
    for c in sw.channels:
        for kind in ("plain", "structured"):
            ae = stages.get(f"ae-{ae_name(kind, c, 0)}")
            if ae is not None:
                rows.append((c, kind, ae["result"]["model_url"]))
    if not rows:
        return False
    plt = RP._plt()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(1.5 * n, 1.5 * (len(rows) + 1)), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
    axes[0, 0].set_ylabel("image", fontsize=7, rotation=0, ha="right")
    recon_rows = [("original", images)]
    for i, (c, kind, url) in enumerate(rows, start=1):
        ae = StructuredAutoencoder.from_pretrained(url).eval()
        with torch.no_grad():
            z = ae.encode(x).numpy()
        for j in range(n):
            axes[i, j].imshow(z[j].mean(0), cmap="viridis", interpolation="nearest")
        axes[i, 0].set_ylabel(f"{kind}\nc={c}", fontsize=7, rotation=0, ha="right", va="center")
        for cp in eval_channels(c):
            recon_rows.append((f"{kind} c={c}: first {cp}", reconstruct_grid(url, images, cp)))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Figure 2 (toy scale): channel-wise average of the latent", fontsize=8)
    RP._save(fig, path_latent)
    fig, axes = plt.subplots(len(recon_rows), 1, figsize=(1.0 * n + 2.5, 0.9 * len(recon_rows)), squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], recon_rows):
        ax.imshow(np.concatenate(list(imgs), axis=1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Reconstruction from the first c' channels (no fine-tune)", fontsize=8)
    RP._save(fig, path_recon)
    return True


def _samples(root: Path, stages: dict, sw: Any, names: list[tuple[str, str]], path: Path, per_class: int = 4) -> bool:
    """Final-checkpoint samples, a panel per run (same noise and labels), a row per class."""
    panels = []
    for label, name in names:
        f = root / "eval" / "gen" / name / f"samples-{sw.scale.dit_steps:07d}.npz"
        if not f.exists():
            continue
        z = np.load(f)
        images, labels = z["images"], z["labels"]
        ks = sorted(set(labels.tolist()))
        rows = []
        for k in ks:
            pick = images[labels == k][:per_class]
            pick = np.concatenate([pick, np.full((per_class - len(pick), *images.shape[1:]), 255, np.uint8)])
            rows.append(np.concatenate(list(pick), axis=1))
        panels.append((label, np.concatenate(rows, axis=0)))
    if not panels:
        return False
    plt = RP._plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 4.2), squeeze=False)
    for ax, (label, grid) in zip(axes[0], panels):
        ax.imshow(grid)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=7)
    fig.suptitle(f"Samples at step {sw.scale.dit_steps} (seed 0; a row per class, the same noise and labels)",
                 fontsize=8)
    RP._save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _held(v: dict) -> str:
    return {True: "**HELD**", False: "**DID NOT HOLD**", None: "**NOT (FULLY) MEASURED**"}[v.get("held")]


def _stage_of(name: str) -> str:
    """prep / fig1b (plain AEs seed 0 and their no-ADT runs) / fig2 (structured AEs seed 0) / table5 (the rest)."""
    if name in ("data", "proxy"):
        return "prep"
    if re.fullmatch(r"(ae|recon|encode|floor)-plain-c\d+-a0|dit-plain-c\d+-a0-noadt-s\d+", name):
        return "fig1b"
    if re.fullmatch(r"(ae|recon)-structured-c\d+-a0", name):
        return "fig2"
    if re.fullmatch(r"(ae|recon)-(plain|structured)-c\d+-a0-\d+st", name):
        return "table1"
    return "table5"


def _load_summary(root: Path) -> str:
    f = root / "load.log"
    if not f.exists():
        return "not recorded"
    vals = [float(line.split()[1]) for line in f.read_text().splitlines() if len(line.split()) >= 2]
    return f"1-min load average sampled every minute: min {min(vals):.1f}, mean {np.mean(vals):.1f}, max " \
           f"{max(vals):.1f} ({len(vals)} samples)" if vals else "not recorded"


def _learns_verdicts() -> list[str]:
    """The verdict lines of the committed f4c8 report (the Table 6 control), quoted as they stand."""
    f = Path(__file__).resolve().parent / "RESULTS-learns.md"
    if not f.exists():
        return ["(RESULTS-learns.md not found)"]
    return [line for line in f.read_text().splitlines()
            if re.match(r"^- (Figure 3|Table 1|Table 5).*\*\*(HELD|DID NOT HOLD)\*\*", line)]


# ---------------------------------------------------------------------------------------------------------------
# The report, one function per section (each returns its markdown lines and draws its figures)
# ---------------------------------------------------------------------------------------------------------------


def _header_section(sweep_name: str, command: str, machine: str) -> list[str]:
    return [f"# DC-AE 1.5 where its claim lives: many latent channels, on Fashion-MNIST (issue 21, `--sweep {sweep_name}`)",
            "", f"Generated by `experiments/channels.py` on {_dt.date.today().isoformat()}. Machine: {machine}. "
            "**No GPU was lent to this task**: everything ran on the CPU; no GPU number appears in this file.", "",
            "Commands (from the repository root; a rerun with the same `--root` skips every finished run):", "", "```",
            ".venv/bin/python -m experiments.channels --root /work/exp21 --worker 0 --workers 2 &",
            ".venv/bin/python -m experiments.channels --root /work/exp21 --worker 1 --workers 2 &",
            command, "```", ""]


def _setting_section(stages: dict, sw: Any) -> list[str]:
    sc = sw.scale
    ds = stages.get("data", {}).get("result", {})
    proxy = stages.get("proxy", {}).get("result", {})
    return ["## Setting", "",
            f"- Data: Fashion-MNIST training split ({ds.get('source', '?')}), the first {sw.per_class} images of each "
            f"of the 10 classes ({ds.get('num_samples', '?')} images), 28 px zero-padded to {sc.resolution} px, grey "
            "repeated to RGB, written as a class-folder tree and packed by the pipeline (`storage.packing."
            "pack_image_folder`).",
            f"- Autoencoders: `tiny-f4c8`'s architecture (f4: {sc.resolution} px → {sc.resolution // 4}×"
            f"{sc.resolution // 4}×c) with c ∈ {list(sw.channels)}; every AE {sc.ae_steps} steps, batch {sc.ae_batch}, "
            f"lr {sc.ae_lr} (warm-up {sc.ae_warmup}, then {sc.ae_schedule}), L1 only (no LPIPS weights here, no GAN). "
            "*plain* = no channel masking; *structured* = Eq. 1 with c' per batch from the paper's rule (c/8 in steps "
            "of c/32). The dcae15 AE trainer (`dcae15.ae.train.train_autoencoder`), encoder (`dcae15.ae.encode`).",
            f"- Diffusion: `{sc.dit_model}` (flow matching) on 2×2 latent patches, {sc.dit_steps} steps, batch "
            f"{sc.dit_batch}, lr {sc.dit_lr} (warm-up {sc.dit_warmup}), EMA {sc.dit_ema}, latents × the store's "
            f"1/RMS; the same backbone and budget on every store; diffusion seeds {list(sw.dit_seeds)}. ADT = Eq. 2 "
            "with the same c' list as the structured AE.",
            f"- Evaluation every {sc.eval_every} steps: {sc.eval_samples} class-conditional samples ({sc.sampler} "
            f"{sc.sample_steps} steps, CFG {sc.cfg_scale}, the same noise and labels for every run) from the EMA "
            "weights; proxy-FID against the training images and class accuracy (chance 0.1), both with the "
            f"project's proxy classifier trained on this data (`{proxy.get('extractor_label', '?')}`, held-out "
            f"accuracy {RP._f(proxy.get('held_out_accuracy'), 3)}). Proxy numbers compare only with each "
            "other.", ""]


def _verdict_lines(key: str, x: dict, lo: int, hi: int) -> list[str]:
    """One verdict: the claim, held or not, why it was not judged, and the numbers behind it."""
    md = [f"- `{key}` — {_held(x)}: {x['claim']}."]
    if x.get("reason"):
        md.append(f"  Why not judged: {x['reason']}.")
    if key == "fig1b_recon" and "psnr" in x:
        md.append("  Plain-AE full-channel PSNR per c: " + ", ".join(f"c={c}: {p:.2f} dB" for c, p in x["psnr"].items())
                  + f"; gain {x['gain_db']:+.2f} dB. proxy-rFID per c: "
                  + ", ".join(f"c={c}: {r:.3f}" for c, r in x["rfid"].items()) + ".")
    if key == "fig1b_generation" and "final_fid" in x:
        md.append("  Final proxy-FID per c: " + "; ".join(f"c={c}: {_pm(d)}" for c, d in x["final_fid"].items())
                  + ".")
        md.append("  Final class accuracy per c: " + "; ".join(f"c={c}: {_pm(d)}" for c, d in x["final_acc"].items())
                  + ".")
        md.append(f"  Channel counts whose final proxy-FID is worse than c={lo}'s beyond the seed spread: "
                  f"{x['slowdown_cs'] or 'none'}.")
    if key == "table1" and "gap" in x:
        md.append(f"  Structured − plain full-channel PSNR at c={hi}: {_pm(x['gap'], 2)} dB (per AE seed "
                  + ", ".join(f"{g:+.2f}" for g in x["gap"]["values"]) + ").")
    if key.startswith("table5") and "reach" in x:
        md.append(f"  {x['claim_text']}.")
        for label, r in x["reach"].items():
            md.append(f"  - {label}: reaches it at step {RP._f(r['steps_to_baseline_final'])}; final "
                      f"{r['final_mean']:.3f} ± {r['final_std']:.3f} (min–max {r['final_min']:.3f}–"
                      f"{r['final_max']:.3f}).")
    if x.get("note"):
        md.append(f"  Note — {x['note']}.")
    return md


def _verdicts_section(v: dict, sw: Any) -> list[str]:
    md = ["## Verdicts (declared in `experiments/channels.py` before the runs)", ""]
    for key, x in v.items():
        md += _verdict_lines(key, x, min(sw.channels), sw.c_max)
    return md + [""]


def _fig1b_section(root: Path, stages: dict, sw: Any, col: dict, figs: Path, tag: str) -> list[str]:
    """Figure 1b: the plain AEs' reconstruction and generation per c, the curves per checkpoint, the samples."""
    md = ["## Figure 1b at toy scale: the channel sweep (plain AEs)", "",
          "| c | PSNR | SSIM | proxy-rFID | recon floor proxy-FID | recon floor acc. | final proxy-FID | final class acc. |",
          "|---|---|---|---|---|---|---|---|"]
    for c in sw.channels:
        r = (col[c]["recon_plain"] or {}).get(c, {})
        f = col[c]["floor"] or {}
        md.append(f"| {c} | {RP._f(r.get('psnr'))} | {RP._f(r.get('ssim'), 3)} | {RP._f(r.get('proxy-rfid'), 3)} | "
                  f"{RP._f(f.get('reconstruction_proxy_fid'), 3)} | {RP._f(f.get('reconstruction_proxy_acc'), 3)} | "
                  f"{_pm(col[c]['final_fid'])} | {_pm(col[c]['final_acc'])} |")
    steps = sorted({s for c in sw.channels for pts in col[c]["curves"].values() for s, _ in pts})
    for key, title in (("curves", "proxy-FID"), ("acc", "class accuracy")):
        md += ["", f"{title} per checkpoint (mean ± std over seeds):", "",
               "| c | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for c in sw.channels:
            cells = []
            for s in steps:
                vals = [dict(p)[s] for p in col[c][key].values() if s in dict(p)]
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "—")
            md.append(f"| {c} | " + " | ".join(cells) + " |")
    md.append("")
    _fig1b(col, sw, figs / f"{tag}_fig1b.png")
    _fig1b_curves(col, sw, figs / f"{tag}_fig1b_curves.png")
    md += [f"![Figure 1b](figures/{tag}_fig1b.png)", "", f"![convergence per c](figures/{tag}_fig1b_curves.png)", ""]
    if _samples(root, stages, sw, [(f"plain c={c}", f"{ae_name('plain', c, 0)}-noadt-s0") for c in sw.channels],
                figs / f"{tag}_samples_per_c.png"):
        md += [f"![samples per c](figures/{tag}_samples_per_c.png)", ""]
    return md


def _fig2_section(stages: dict, sw: Any, col: dict, figs: Path, tag: str) -> list[str]:
    """Figure 2: PSNR from the first c' channels, plain and structured; the latent and reconstruction figures."""
    md = ["## Figure 2 at toy scale: the latent space, plain and structured", "",
          "Reconstruction PSNR from the first c' channels (no fine-tune; c' = c/8, c/4, c/2, c):", "",
          "| c | kind | " + " | ".join(f"c/{d}" for d in (8, 4, 2)) + " | c |", "|---|---|---|---|---|---|"]
    for c in sw.channels:
        for kind in ("plain", "structured"):
            rows = col[c][f"recon_{kind}"]
            if rows:
                md.append(f"| {c} | {kind} | " + " | ".join(RP._f(rows.get(cp, {}).get("psnr"))
                                                           for cp in (max(1, c // 8), max(1, c // 4), max(1, c // 2), c)) + " |")
    md.append("")
    ds = stages.get("data", {}).get("result", {})
    if _fig2(stages, sw, ds["url"], figs / f"{tag}_fig2_latent.png", figs / f"{tag}_fig2_recon.png") if ds else False:
        md += [f"![channel-wise average latent](figures/{tag}_fig2_latent.png)", "",
               f"![reconstruction from the first c' channels](figures/{tag}_fig2_recon.png)", ""]
    return md


def _table5_section(stages: dict, sw: Any, figs: Path, tag: str) -> list[str]:
    """Table 5 at the largest c: final proxy-FID and class accuracy per variant, and the convergence figure."""
    hi = sw.c_max
    md = [f"## Table 5 at c = {hi}: plain vs SLS vs ADT vs SLS + ADT", ""]
    cur_f, cur_a = _t5_curves(stages, sw, "proxy-fid"), _t5_curves(stages, sw, "proxy-acc")
    md += ["| variant | runs (AE seed × diffusion seed) | final proxy-FID | final class acc. |", "|---|---|---|---|"]
    for kind, adt, label in RP._VARIANTS:
        f_, a_ = cur_f.get((kind, adt), {}), cur_a.get((kind, adt), {})
        md.append(f"| {label} | {len(f_)} | {_pm(_ms([p[-1][1] for p in f_.values()]) if f_ else None)} | "
                  f"{_pm(_ms([p[-1][1] for p in a_.values()]) if a_ else None)} |")
    md.append("")
    if cur_f:
        RP._curve_panels([(cur_f, "proxy-FID (lower is better)"), (cur_a, "class accuracy (higher is better)")],
                         f"Table 5 at c={hi}: mean ± std over AE seeds × diffusion seeds", figs / f"{tag}_table5.png",
                         detailed=True)
        md += [f"![Table 5 convergence](figures/{tag}_table5.png)", ""]
    return md


def _table1_section(stages: dict, sw: Any, figs: Path, tag: str) -> list[str]:
    """Table 1's budget: the plain / structured pair at the largest c at longer AE budgets, against the target."""
    sc, hi = sw.scale, sw.c_max
    target = TARGETS["full_psnr_gap_db"]  # the declared target, as in the verdict
    budget = table1_budget(stages, sw)
    md = [f"## Table 1 at c = {hi}: the AE budget that full-channel parity needs", "",
          f"The `table1` verdict above is judged at the sweep's budget ({sc.ae_steps} steps), the one Table 5's AEs "
          "were trained with. Here the same pair (AE seed 0) at longer budgets, each its own run (warm-up "
          f"{sc.ae_warmup}, cosine to 0 at its budget); the target is |gap| <= {target} dB.", "",
          f"| AE steps | plain PSNR (c={hi}) | structured PSNR (c={hi}) | gap | plain PSNR (c/8) | "
          "structured PSNR (c/8) | seconds (both AEs) |", "|---|---|---|---|---|---|---|"]
    for r in budget:
        md.append(f"| {r['steps']} | {r['plain_psnr']:.2f} | {r['structured_psnr']:.2f} | {r['gap']:+.2f} | "
                  f"{r['plain_psnr_lo']:.2f} | {r['structured_psnr_lo']:.2f} | {r['seconds']:.0f} |")
    if not budget:
        return md + ["", "(not yet run)", ""]
    within = [r["steps"] for r in budget if abs(r["gap"]) <= target]
    md += ["", (f"Smallest measured budget within {target} dB: **{within[0]} steps**." if within else
                f"No measured budget (up to {budget[-1]['steps']} steps) is within {target} dB: the budget "
                "Table 1 needs here is larger than that (not extrapolated)."), ""]
    _t1_budget_fig(budget, sw, figs / f"{tag}_table1_budget.png")
    return md + [f"![Table 1 budget](figures/{tag}_table1_budget.png)", ""]


def _table6_section() -> list[str]:
    """Table 6's analogue: the committed f4c8 control's verdicts, quoted."""
    return ["## Table 6 analogue: the small-c control (f4c8 on the shapes data, `RESULTS-learns.md`)", "",
            "The paper's Table 6 finds DC-AE 1.5 slightly worse than DC-AE at f32c32 (no sparsity problem at few "
            "channels). The toy-scale control is issue 12's f4c8 result, measured earlier on the shapes dataset "
            "(`experiments/RESULTS-learns.md`); its verdicts as they stand:", ""] + _learns_verdicts() + [""]


def _cost_section(root: Path, stages: dict) -> list[str]:
    """The machine's load and the seconds per stage of the plan."""
    by_stage: dict[str, float] = {}
    for k, s in stages.items():
        by_stage[_stage_of(k)] = by_stage.get(_stage_of(k), 0.0) + s["seconds"]
    md = ["## Cost", "", f"Load on the shared 2-core machine during the runs: {_load_summary(root)}. Two worker "
          "processes, one torch thread each. Seconds are the sum of the runs' own wall times (two run at once).", "",
          "| stage | runs finished | seconds (sum) |", "|---|---|---|"]
    for st in ("prep", "fig1b", "fig2", "table5", "table1"):
        n = sum(1 for k in stages if _stage_of(k) == st)
        md.append(f"| {st} | {n} | {by_stage.get(st, 0.0):.0f} |")
    return md


def _missing_section(missing: list[str]) -> list[str]:
    return ["", "## Not yet run", ""] + ([f"- {m}" for m in missing] if missing
                                          else ["Nothing: every run of the plan has finished."])


def _run_times_section(stages: dict) -> list[str]:
    return (["", "<details><summary>Run times</summary>", "", "| run | seconds |", "|---|---|"]
            + [f"| {k} | {s['seconds']:.1f} |" for k, s in stages.items()] + ["", "</details>"])


def write_report(root: Path, sw: Any, sweep_name: str, results_dir: Path, *, command: str, machine: str) -> dict:
    """``RESULTS.md`` (sweep ``fmnist``) or ``RESULTS-channels-<sweep>.md`` and ``figures/channels_<sweep>_*.png``."""
    stages = RP_stages(root)
    results_dir.mkdir(parents=True, exist_ok=True)
    figs = results_dir / "figures"
    figs.mkdir(exist_ok=True)
    tag = f"channels_{sweep_name}"
    name = "RESULTS.md" if sweep_name == "fmnist" else f"RESULTS-channels-{sweep_name}.md"
    previous = (results_dir / name).read_text() if (results_dir / name).exists() else ""
    col = collect(stages, sw)
    v = verdicts(stages, sw)
    missing = _missing(stages, sw)
    md = _header_section(sweep_name, command, machine) + _setting_section(stages, sw) + _verdicts_section(v, sw)
    md += _fig1b_section(root, stages, sw, col, figs, tag)
    md += _fig2_section(stages, sw, col, figs, tag)
    md += _table5_section(stages, sw, figs, tag)
    md += _table1_section(stages, sw, figs, tag)
    md += _table6_section()
    md += _cost_section(root, stages) + _missing_section(missing) + _run_times_section(stages)
    RP.write_markdown(md, results_dir / name, results_dir / f"notes-channels-{sweep_name}.md")
    if name == "RESULTS.md" and (results_dir / "RESULTS-wide.md").exists():  # keep the wide sweep's summary on top
        from experiments.channels_wide_report import restore_head

        restore_head(results_dir / name, previous)
    return {"verdicts": {k: x.get("held") for k, x in v.items()}, "results": str(results_dir / name), "details": v,
            "missing": missing}


def RP_stages(root: Path) -> dict:
    """Every finished marker under ``root`` (``{name: {"result", "seconds", "finished"}}``)."""
    from experiments.replicate import Stages

    return Stages(root).all()


def _missing(stages: dict, sw: Any) -> list[str]:
    """The plan's runs without their markers, by stage."""
    want = planned_markers(sw)
    seen: set[str] = set()  # a run two stages need (the structured AE at the largest c) is listed once
    out = []
    for st, names in want.items():
        for n in names:
            if n not in stages and n not in seen:
                out.append(f"{st}: {n}")
            seen.add(n)
    return out
