"""The replication's report: tables, verdicts against the issue's targets, PNG figures, RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TARGETS", "verdicts", "write_markdown", "write_report"]

#: The issue's targets (stated before any run; not tuned toward).
TARGETS = {"partial_psnr_gain_db": 3.0, "full_psnr_gap_db": 0.5, "speedup": 2.0}
_VARIANTS = (("plain", False, "plain AE, no ADT (baseline)"), ("plain", True, "plain AE + ADT"),
             ("structured", False, "structured AE (SLS), no ADT"), ("structured", True, "SLS + ADT"))


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------


def _rows_by_c(rows: list[dict]) -> dict[int, dict]:
    return {int(r["channels"]): r for r in rows}


def _curves(stages: dict[str, dict], key: str = "proxy-fid") -> dict[tuple[str, bool], dict[int, list[tuple[int, float]]]]:
    """{(kind, adt): {seed: [(step, value of ``key``), ...]}} from the finished dit-* stages."""
    out: dict[tuple[str, bool], dict[int, list[tuple[int, float]]]] = {}
    for name, st in stages.items():
        if not name.startswith("dit-"):
            continue
        kind, adt, seed = name[4:].split("-")
        pts = sorted((int(p["step"]), float(p[key])) for p in st["result"]["curve"] if key in p)
        if not pts:
            continue
        out.setdefault((kind, adt == "adt"), {})[int(seed[1:])] = pts
    return out


def _mean_curve(per_seed: dict[int, list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std over seeds) on the steps every seed has."""
    common = sorted(set.intersection(*(set(s for s, _ in pts) for pts in per_seed.values())))
    vals = np.array([[dict(pts)[s] for s in common] for pts in per_seed.values()])
    return np.array(common), vals.mean(0), vals.std(0)


def _first_reach(steps: np.ndarray, values: np.ndarray, level: float, higher: bool = False) -> int | None:
    hit = np.flatnonzero(values >= level if higher else values <= level)
    return int(steps[hit[0]]) if hit.size else None


def _recon_pairs(stages: dict) -> list[tuple[dict, dict]]:
    """(plain, structured) recon results per AE seed: the primary pair first, then ``recon-<kind>-a<seed>``."""
    pairs = []
    if "recon-plain" in stages and "recon-structured" in stages:
        pairs.append((stages["recon-plain"]["result"], stages["recon-structured"]["result"]))
    extra = sorted({k.rsplit("-a", 1)[1] for k in stages if k.startswith("recon-plain-a")}, key=int)
    for a in extra:
        if f"recon-structured-a{a}" in stages:
            pairs.append((stages[f"recon-plain-a{a}"]["result"], stages[f"recon-structured-a{a}"]["result"]))
    return pairs


def _structure_curves(stages: dict, key: str) -> dict[tuple[str, bool], dict[int, list[tuple[int, float]]]]:
    """The structure-eval stage's curves in ``_curves``' shape (key "fid" or "acc")."""
    se = stages.get("structure-eval")
    out: dict[tuple[str, bool], dict[int, list[tuple[int, float]]]] = {}
    if not se:
        return out
    for name, pts in se["result"]["curves"].items():
        if not pts:
            continue
        kind, adt, seed = name.split("-")
        out.setdefault((kind, adt == "adt"), {})[int(seed[1:])] = sorted((p["step"], p[key]) for p in pts)
    return out


def _speed_verdicts(curves: dict, metric: str = "proxy-FID", higher: bool = False) -> dict[str, Any]:
    """Table 5 verdicts from {(kind, adt): {seed: [(step, value)]}}: steps to the baseline's final value (mean
    over seeds; per seed against that seed's baseline), and each variant's final value (mean, std, min, max)."""
    out: dict[str, Any] = {}
    base = curves.get(("plain", False))
    if not (base and ("structured", True) in curves):
        return out
    steps_b, mean_b, _ = _mean_curve(base)
    final_step, level = int(steps_b[-1]), float(mean_b[-1])
    reach = {}
    for kind, adt, label in _VARIANTS:
        if (kind, adt) not in curves:
            continue
        st, mu, _ = _mean_curve(curves[(kind, adt)])
        r = _first_reach(st, mu, level, higher)
        per_seed = {}
        for seed, pts in curves[(kind, adt)].items():
            if seed in base:
                lvl = base[seed][-1][1]
                s_arr, v_arr = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
                per_seed[seed] = _first_reach(s_arr, v_arr, lvl, higher)
        finals = np.array([pts[-1][1] for pts in curves[(kind, adt)].values()])
        reach[label] = {"steps_to_baseline_final": r, "final_mean": float(mu[-1]),
                        "final_std": float(finals.std()), "final_min": float(finals.min()),
                        "final_max": float(finals.max()), "speedup": (final_step / r) if r else None,
                        "per_seed_steps": per_seed}
    # The baseline's own first step at its final value: on a curve that has flattened out this is earlier than the
    # last step, and "half the steps" is measured against it (the baseline did not need the steps after it).
    own = reach["plain AE, no ADT (baseline)"]["steps_to_baseline_final"] or final_step
    for r_ in reach.values():
        r_["speedup"] = (own / r_["steps_to_baseline_final"]) if r_["steps_to_baseline_final"] else None
    r = reach["SLS + ADT"]["steps_to_baseline_final"]
    first = float(mean_b[0])
    improves = (level > first) if higher else (level < first)
    why = None
    if not improves:  # the target presumes a baseline that gets better with training
        why = (f"inconclusive: the baseline's own {metric} curve does not improve (first checkpoint {first:.3f}, "
               f"final {level:.3f}), so reaching its final value says nothing about speed")
    baseline_curve = {"steps": [int(x) for x in steps_b], "mean": [float(x) for x in mean_b], "improves": improves,
                      "monotone": bool(np.all(np.diff(mean_b) > 0) if higher else np.all(np.diff(mean_b) < 0)),
                      "first_reach_of_final": int(own)}
    half = own / TARGETS["speedup"]
    out["table5_speed"] = {
        "claim": f"SLS + ADT reaches the baseline's final {metric} ({level:.3f} at step {final_step}, mean "
                 f"over seeds) in <= half the steps the baseline needs to first reach it ({own} → <= {half:.0f})",
        "metric": metric, "baseline_final": level, "baseline_final_step": final_step, "baseline_steps": own,
        "reach": reach, "baseline_curve": baseline_curve,
        "held": None if why else bool(r is not None and r <= half), "reason": why}
    alone = [lab for lab in ("plain AE + ADT", "structured AE (SLS), no ADT") if lab in reach]
    out["table5_alone"] = {
        "claim": f"either SLS or ADT alone does NOT reach the baseline's final {metric} in <= half the baseline's "
                 "steps",
        "metric": metric,
        "held": None if (why or not alone) else bool(all(
            not (reach[lab]["steps_to_baseline_final"] is not None
                 and reach[lab]["steps_to_baseline_final"] <= half) for lab in alone)),
        "reason": why,
        # "either alone does not" only means something next to a combination that does
        "note": None if (why or (r is not None and r <= half)) else
        "vacuous: SLS + ADT does not reach it in half the steps either, so this says nothing about the combination"}
    return out


def verdicts(stages: dict[str, dict]) -> dict[str, Any]:
    """The three claims, each with its numbers and ``held``: True / False / None (not measured)."""
    out: dict[str, Any] = {}
    pairs = _recon_pairs(stages)
    if pairs:
        c = pairs[0][1]["latent_channels"]
        q = c // 4

        def spread(vals: list[float]) -> dict:
            v = np.asarray(vals, float)
            return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
                    "per_seed": [float(x) for x in v]}

        def psnr(rows: list[dict], ch: int) -> float | None:
            r = _rows_by_c(rows).get(ch)
            return None if r is None else float(r["psnr"])

        for key, part, label in (("fig3_partial", "finetuned", "decoder fine-tuned"),
                                 ("fig3_partial_no_ft", "as_trained", "decoder as trained, no fine-tune")):
            got = [(psnr(p[part], q), psnr(s_[part], q)) for p, s_ in pairs]
            got = [g for g in got if None not in g]
            if not got:
                continue
            gain = spread([b_ - a_ for a_, b_ in got])
            out[key] = {
                "claim": f"structured AE's PSNR from the first {q}/{c} channels ({label}) >= "
                         f"{TARGETS['partial_psnr_gain_db']} dB above the plain AE's (mean over AE seeds)",
                "channels": q, "plain_psnr": float(np.mean([g[0] for g in got])),
                "structured_psnr": float(np.mean([g[1] for g in got])), "gain_db": gain["mean"], "gain": gain,
                "ae_seeds": len(got), "held": bool(gain["mean"] >= TARGETS["partial_psnr_gain_db"])}
        full = [(_rows_by_c(p["as_trained"])[c], _rows_by_c(s_["as_trained"])[c]) for p, s_ in pairs]
        gap = spread([s_["psnr"] - p["psnr"] for p, s_ in full])
        out["table1_full"] = {
            "claim": f"full-channel PSNR of the two AEs within {TARGETS['full_psnr_gap_db']} dB (mean over AE seeds)",
            "plain_psnr": float(np.mean([p["psnr"] for p, _ in full])),
            "structured_psnr": float(np.mean([s_["psnr"] for _, s_ in full])), "gap_db": gap["mean"], "gap": gap,
            "plain_proxy_rfid": float(np.mean([p.get("proxy-rfid", np.nan) for p, _ in full])),
            "structured_proxy_rfid": float(np.mean([s_.get("proxy-rfid", np.nan) for _, s_ in full])),
            "ae_seeds": len(full), "held": bool(abs(gap["mean"]) <= TARGETS["full_psnr_gap_db"])}
    t5 = _speed_verdicts(_curves(stages))
    out.update(t5)
    acc = _curves(stages, "proxy-acc")
    if acc:
        out.update({f"{k}_acc": x for k, x in _speed_verdicts(acc, "class accuracy", higher=True).items()})
    st = _structure_curves(stages, "fid")
    if st:
        out.update({f"{k}_structure_proxy": v for k, v in _speed_verdicts(st).items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, path)


def _fig3_grid(stages: dict, ds_url: str, resolution: int, path: Path, n: int = 8) -> None:
    """Originals, then per AE one row per fine-tuned c' and the full c (as trained)."""
    from experiments.recon import reconstruct_grid
    from storage.shards import open_dataset

    ds = open_dataset(ds_url)
    images, _, valid = ds.read_range(0, min(ds.num_samples, 4 * n), resolution)
    images = images[np.asarray(valid, bool)][:n]
    rows = [("original", images)]
    for kind in ("plain", "structured"):
        rec = stages[f"recon-{kind}"]["result"]
        q = rec["latent_channels"] // 4
        rows.append((f"{kind} c'={q} (no ft)", reconstruct_grid(stages[f"ae-{kind}"]["result"]["model_url"], images, q)))
        for r in rec["finetuned"]:
            rows.append((f"{kind} c'={r['channels']} (dec. ft)", reconstruct_grid(r["model_url"], images, r["channels"])))
        c = rec["latent_channels"]
        rows.append((f"{kind} c={c}", reconstruct_grid(stages[f"ae-{kind}"]["result"]["model_url"], images, c)))
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * len(images), 1.15 * len(rows)))
    for ax, (label, imgs) in zip(np.atleast_1d(axes), rows):
        ax.imshow(np.concatenate(list(imgs), axis=1))
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Reconstruction from the first c' latent channels (Figure 3, toy scale)", fontsize=9)
    _save(fig, path)


def _psnr_by_seed(stages: dict) -> dict[tuple[str, str], dict[int, list[float]]]:
    """{(kind, "as_trained"|"finetuned"): {c': [PSNR per AE seed]}}; the full c joins the fine-tuned line (its
    decoder is the one trained for c)."""
    out: dict[tuple[str, str], dict[int, list[float]]] = {}
    for pair in _recon_pairs(stages):
        for kind, rec in zip(("plain", "structured"), pair):
            c = rec["latent_channels"]
            for part in ("as_trained", "finetuned"):
                rows = _rows_by_c(rec[part])
                if part == "finetuned":
                    rows[c] = _rows_by_c(rec["as_trained"])[c]
                for ch, r in rows.items():
                    out.setdefault((kind, part), {}).setdefault(ch, []).append(float(r["psnr"]))
    return out


def _psnr_figure(stages: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    data = _psnr_by_seed(stages)
    n = len(_recon_pairs(stages))
    for kind, color in (("plain", "tab:blue"), ("structured", "tab:red")):
        for part, style, label in (("as_trained", "--", "as trained"), ("finetuned", "o-", "decoder fine-tuned per c'")):
            d = data.get((kind, part), {})
            ch = sorted(d)
            mu = np.array([np.mean(d[c]) for c in ch])
            sd = np.array([np.std(d[c]) for c in ch])
            ax.errorbar(ch, mu, yerr=sd, fmt=style, color=color, alpha=0.7 if part == "as_trained" else 1.0,
                        capsize=2, ms=4, label=f"{kind}, {label}")
    ax.set_xlabel("latent channels used (c')")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"mean ± std over {n} AE seed{'s' if n > 1 else ''}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


_VARIANT_COLORS = {("plain", False): "tab:gray", ("plain", True): "tab:blue", ("structured", False): "tab:orange",
                   ("structured", True): "tab:red"}


def _curve_panels(panels: list[tuple[dict, str]], title: str, path: Path, *, detailed: bool,
                  floors: list[dict[str, float]] | None = None) -> None:
    """Two panels of mean ± std curves per variant. ``detailed`` adds seed counts, the baseline's final value
    and a log scale on the first panel (the primary scorer's figure)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (ax, (curves, ylabel)) in enumerate(zip(axes, panels)):
        for j, (fl_label, fl) in enumerate((floors[i] if floors else {}).items()):
            ax.axhline(fl, color="black", ls=("--", "-.", ":")[j % 3], lw=0.8, label=fl_label)
        for kind, adt, label in _VARIANTS:
            if (kind, adt) not in curves:
                continue
            color = _VARIANT_COLORS[(kind, adt)]
            steps, mu, sd = _mean_curve(curves[(kind, adt)])
            name = f"{label} ({len(curves[(kind, adt)])} seeds)" if detailed else label
            ax.plot(steps, mu, "o-", color=color, label=name, ms=3)
            ax.fill_between(steps, mu - sd, mu + sd, color=color, alpha=0.15)
            if detailed and (kind, adt) == ("plain", False):
                ax.axhline(mu[-1], color="tab:gray", ls=":", lw=1)
        ax.set_xlabel("diffusion training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if detailed:
        axes[0].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def _convergence_figure(stages: dict, path: Path) -> None:
    floors = [{}, {}]
    for k in ("plain", "structured"):
        f = stages.get(f"floor-{k}")
        if f:
            floors[0][f"{k} AE reconstructions"] = f["result"]["reconstruction_proxy_fid"]
            if "reconstruction_proxy_acc" in f["result"]:
                floors[1][f"{k} AE reconstructions"] = f["result"]["reconstruction_proxy_acc"]
    _curve_panels([(_curves(stages, "proxy-fid"), "proxy-FID (lower is better)"),
                   (_curves(stages, "proxy-acc"), "proxy class accuracy of samples (higher is better)")],
                  "Convergence (Table 5 ablation, toy scale): mean ± std over seeds; black: the AEs' own "
                  "reconstructions (what a perfect diffusion model would reach)", path, detailed=True, floors=floors)


def _structure_figure(stages: dict, path: Path) -> None:
    _curve_panels([(_structure_curves(stages, "fid"), "structure proxy-FID (16 px classifier)"),
                   (_structure_curves(stages, "acc"), "structure proxy class accuracy")],
                  "Secondary scorer (added after the fact): 16 px proxy classifier, mean ± std over seeds", path,
                  detailed=False)


def _class_names(stages: dict, num_classes: int) -> list[str]:
    src = Path(stages["data"]["result"]["source"])
    names = sorted(p.name for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def _samples_figure(root: Path, stages: dict, sc: dict, seed: int, path: Path, per_class: int = 6) -> bool:
    """Final-checkpoint samples of the four variants (one seed, same noise and labels): a row per class."""
    panels = []
    for kind, adt, label in _VARIANTS:
        d = root / "eval" / "gen" / f"{kind}-{'adt' if adt else 'noadt'}-s{seed}"
        f = d / f"samples-{sc['dit_steps']:07d}.npz"
        if not f.exists():
            continue
        z = np.load(f)
        images, labels = z["images"], z["labels"]
        rows = []
        for c in range(sc["num_classes"]):
            pick = images[labels == c][:per_class]
            if len(pick) < per_class:  # too few samples of a class: pad with white tiles
                pad = np.full((per_class - len(pick), *images.shape[1:]), 255, np.uint8)
                pick = np.concatenate([pick, pad])
            rows.append(np.concatenate(list(pick), axis=1))
        panels.append((label, np.concatenate(rows, axis=0)))
    if not panels:
        return False
    names = _class_names(stages, sc["num_classes"])
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.6))
    h = panels[0][1].shape[0] / sc["num_classes"]
    for i, (ax, (label, grid)) in enumerate(zip(np.atleast_1d(axes), panels)):
        ax.imshow(grid)
        ax.set_xticks([])
        ax.set_yticks([(k + 0.5) * h for k in range(sc["num_classes"])])
        ax.set_yticklabels(names if i == 0 else [], fontsize=7)
        ax.set_title(label, fontsize=8)
    fig.suptitle(f"Samples at step {sc['dit_steps']} (seed {seed}; {sc['sampler']} {sc['sample_steps']} steps, CFG "
                 f"{sc.get('cfg_scale', 1.0)}; a row per class; the same noise and labels in every panel)", fontsize=8)
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _metric_table(rows_by_kind: dict[str, dict[int, dict]], chans: list[int]) -> list[str]:
    head = "| c' | plain PSNR | struct. PSNR | plain SSIM | struct. SSIM | plain proxy-LPIPS | struct. proxy-LPIPS " \
           "| plain proxy-rFID | struct. proxy-rFID |"
    lines = [head, "|" + "---|" * 9]
    for c in chans:
        p, s = rows_by_kind["plain"].get(c, {}), rows_by_kind["structured"].get(c, {})
        lines.append(f"| {c} | {_f(p.get('psnr'))} | {_f(s.get('psnr'))} | {_f(p.get('ssim'), 3)} | "
                     f"{_f(s.get('ssim'), 3)} | {_f(p.get('proxy-lpips'), 3)} | {_f(s.get('proxy-lpips'), 3)} | "
                     f"{_f(p.get('proxy-rfid'), 3)} | {_f(s.get('proxy-rfid'), 3)} |")
    return lines


def _objective(model: str) -> str:
    from dcae15.models.registry import preset

    obj = preset(model).objective
    return "flow matching, velocity prediction" if obj == "flow" else f"DDPM ε-prediction, {obj[5:]} betas"


def _held(v: dict | None) -> str:
    if v and v.get("held") is None and v.get("reason"):
        return "**INCONCLUSIVE**"
    if not v or v.get("held") is None:
        return "**not measured**"
    return "**HELD**" if v["held"] else "**DID NOT HOLD**"


def write_markdown(lines: list[str], path: Path, notes: Path) -> None:
    """``lines`` and then the hand-written ``notes`` file (when it exists) into ``path``, atomically."""
    if notes.exists():
        lines = [*lines, "", notes.read_text().rstrip()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The report, one function per section (each returns its markdown lines and draws its figures)
# ---------------------------------------------------------------------------------------------------------------


def _header_section(stages: dict[str, dict], session: dict, scale: str, total: float) -> list[str]:
    return [f"# DC-AE 1.5 at toy scale: Figure 3 / Table 1 and Table 5 (`--scale {session['scale']}`, report `{scale}`)", "",
            f"Generated by `experiments/replicate.py` on {_dt.date.today().isoformat()}. Machine: "
            f"{session['machine']}. **No GPU was lent to this task**: everything below ran on the CPU; "
            "no GPU number appears anywhere in this file.", "",
            "Command (from the repository root; a rerun with the same `--root` skips finished stages and resumes "
            "the one that was interrupted):", "", "```", session["command"], "```", "",
            f"Wall time of all stages: **{total / 60:.1f} min** (sum of the stages' own times, which also counts "
            f"any earlier interrupted invocations' finished stages; this invocation: "
            f"{session['this_invocation_seconds'] / 60:.1f} min).", ""]


def _setting_section(stages: dict[str, dict], session: dict) -> list[str]:
    sc = session["scale_config"]
    ds = stages["data"]["result"]
    proxy = stages["proxy"]["result"]
    return ["## Setting", "",
            f"- Data: {ds['source']} → {sc['num_classes'] if 'shapes' in ds['source'] else 'given'} classes, "
            f"{ds.get('num_samples') or sc['num_classes'] * sc['per_class']} images, {sc['resolution']} px.",
            f"- Autoencoders: `{sc['ae_preset']}` (latent {stages['encode-plain']['result']['latent_shape'] if 'encode-plain' in stages else '?'}"
            f" = c×h×w), {sc['ae_steps']} steps, batch {sc['ae_batch']}, lr {sc['ae_lr']} (warm-up "
            f"{sc.get('ae_warmup', 0)}, then {sc.get('ae_schedule', 'constant')}), L1 loss only (LPIPS needs "
            "torchvision weights that cannot be downloaded here; no GAN phase), seed "
            f"{session['ae_seed']}; *plain* = no channel masking, *structured* = Eq. 1 with c' drawn uniformly per "
            "batch from the AE's c' list. Everything else identical.",
            f"- Decoder-only fine-tune per c' ({sc['ft_steps']} steps, lr {sc.get('ft_lr') or sc['ae_lr']}, encoder frozen, "
            "same budget for both AEs), as "
            "the paper does for Figure 3 (\"the decoder is fine-tuned for all settings\"); the frozen encoder keeps "
            "the latent the diffusion model sees unchanged.",
            f"- Diffusion: `{sc['dit_model']}` {sc['dit_overrides'] or ''} ({_objective(sc['dit_model'])}), "
            f"{sc.get('dit_patch', 1)}×{sc.get('dit_patch', 1)} latent patches, "
            f"{sc['dit_steps']} steps, batch {sc['dit_batch']}, lr {sc['dit_lr']} (warm-up {sc['dit_warmup']}, then "
            f"constant), EMA {sc['dit_ema']}, latents × the store's measured 1/RMS; ADT = Eq. 2 with c' per batch from "
            f"the same c' list as the AE; seeds {sc['seeds']} (the spread in Table 5 is over these diffusion seeds; "
            "all runs use the seed-" + str(session['ae_seed']) + " AEs). Identical budgets, seeds and data order in "
            "all four variants.",
            f"- Figure 3 / Table 1 spread: {1 + len([a for a in sc.get('ae_seeds', []) if a != session['ae_seed']])} "
            f"AE seeds per kind ({session['ae_seed']} and extra seeds {list(sc.get('ae_seeds', []))}), each with the "
            "same budget and its own fine-tunes.",
            f"- Evaluation at every checkpoint ({sc['eval_every']} steps): {sc['eval_samples']} class-conditional "
            f"samples ({sc['sampler']}, {sc['sample_steps']} steps, CFG {sc.get('cfg_scale', 1.0)}, uniform labels; "
            "the same noise and labels for every run) from the EMA weights. proxy-FID against the training images' "
            "statistics, and class accuracy (the fraction the classifier assigns to the requested class; chance "
            f"{1 / sc['num_classes']:.3f}), both with one small classifier trained on this data "
            f"(`{proxy['extractor_label']}`, trained with blur and noise augmentation so that it recognises "
            f"shape, not sharpness; held-out accuracy {proxy.get('held_out_accuracy', float('nan')):.3f}). "
            "proxy-LPIPS = LPIPS's un-learned form (unit-normalised activations, squared distance, averaged) on the "
            "same classifier's conv blocks. Proxy numbers are comparable only with each other, never with "
            "Inception FID / real LPIPS.", ""]


_VERDICT_TITLES = (("fig3_partial", "Figure 3 (first quarter of the channels, decoder fine-tuned)"),
                   ("fig3_partial_no_ft", "Figure 3 (first quarter of the channels, no decoder fine-tune)"),
                   ("table1_full", "Table 1 (full channels cost nothing)"),
                   ("table5_speed", "Table 5 on proxy-FID (SLS + ADT converge faster)"),
                   ("table5_alone", "Table 5 on proxy-FID (either alone does not)"),
                   ("table5_speed_acc", "Table 5 on class accuracy (SLS + ADT converge faster)"),
                   ("table5_alone_acc", "Table 5 on class accuracy (either alone does not)"),
                   ("table5_speed_structure_proxy", "Table 5 on the 16 px structure proxy (secondary, added "
                                                    "after the fact)"),
                   ("table5_alone_structure_proxy", "Table 5 alone, 16 px structure proxy (secondary)"))


def _verdict_lines(key: str, title: str, x: dict) -> list[str]:
    """One verdict: the claim, held or not, and the numbers behind it."""
    md = [f"- {title} — {_held(x)}: {x['claim']}."]
    if x.get("reason"):
        md.append(f"  {x['reason'][0].upper() + x['reason'][1:]}.")
    if x.get("note"):
        md.append(f"  Note — {x['note']}.")
    if key.startswith("fig3_partial"):
        g = x["gain"]
        md.append(f"  Plain {x['plain_psnr']:.2f} dB vs structured {x['structured_psnr']:.2f} dB at "
                  f"c'={x['channels']} (mean of {x['ae_seeds']} AE seeds): gain **{g['mean']:+.2f} ± "
                  f"{g['std']:.2f} dB** (min–max {g['min']:+.2f}–{g['max']:+.2f}; per seed "
                  + ", ".join(f"{v:+.2f}" for v in g["per_seed"]) + ").")
    if key == "table1_full":
        g = x["gap"]
        md.append(f"  Plain {x['plain_psnr']:.2f} dB vs structured {x['structured_psnr']:.2f} dB (mean of "
                  f"{x['ae_seeds']} AE seeds): gap **{g['mean']:+.2f} ± {g['std']:.2f} dB** (min–max "
                  f"{g['min']:+.2f}–{g['max']:+.2f}; per seed " + ", ".join(f"{v:+.2f}" for v in g["per_seed"])
                  + f"); proxy-rFID {_f(x['plain_proxy_rfid'], 3)} vs {_f(x['structured_proxy_rfid'], 3)}.")
    if key.startswith("table5_speed"):
        metric = x.get("metric", "proxy-FID")
        bc = x.get("baseline_curve")
        if bc:
            md.append(f"  Baseline's {metric} curve (mean over seeds) at steps {bc['steps']}: "
                      + " → ".join(f"{m:.3f}" for m in bc["mean"])
                      + f" — {'improves' if bc['improves'] else 'DOES NOT improve'} over training"
                      + (" (monotonically)" if bc["monotone"] else " (not monotonically)")
                      + f"; it first reaches its final value at step {bc['first_reach_of_final']}.")
        for label, r in x["reach"].items():
            sp = f"speed-up {r['speedup']:.2f}× vs the baseline's {x['baseline_steps']}" if r["speedup"] \
                else "not reached"
            md.append(f"  - {label}: reaches {x['baseline_final']:.3f} at step "
                      f"{_f(r['steps_to_baseline_final'])} ({sp}); final {metric} **{r['final_mean']:.3f} ± {r['final_std']:.3f}** (min–max "
                      f"{r['final_min']:.3f}–{r['final_max']:.3f}); steps to reach per seed (vs that seed's "
                      f"baseline): {r['per_seed_steps']}.")
    return md


def _verdicts_section(v: dict[str, Any]) -> list[str]:
    md = ["## Verdicts against the issue's targets", ""]
    for key, title in _VERDICT_TITLES:
        x = v.get(key)
        if not x:
            if not key.endswith("structure_proxy"):
                md.append(f"- {title}: not measured yet.")
            continue
        md += _verdict_lines(key, title, x)
    md.append("")
    return md


def _recon_rows(stages: dict[str, dict]) -> tuple[int, dict, dict]:
    """(c, {kind: {c': row}} decoder-fine-tuned with the c row as trained, {kind: {c': row}} as trained)."""
    rec = {k: stages[f"recon-{k}"]["result"] for k in ("plain", "structured")}
    c = rec["structured"]["latent_channels"]
    ft = {k: _rows_by_c(rec[k]["finetuned"]) for k in rec}
    at = {k: _rows_by_c(rec[k]["as_trained"]) for k in rec}
    for k in rec:
        ft[k][c] = at[k][c]
    return c, ft, at


def _fig3_section(stages: dict[str, dict], sc: dict, figs: Path, scale: str) -> list[str]:
    c, ft, at = _recon_rows(stages)
    _fig3_grid(stages, stages["data"]["result"]["url"], sc["resolution"], figs / f"{scale}_fig3_grid.png")
    _psnr_figure(stages, figs / f"{scale}_psnr_vs_channels.png")
    md = ["## Figure 3 as a table: reconstruction from the first c' channels", "",
          f"Decoder fine-tuned per c' ({sc['ft_steps']} steps each, both AEs); the c={c} row is the AE as "
          f"trained. {sc['recon_images']} images.", ""]
    md += _metric_table(ft, sorted(ft["plain"]))
    md += ["", "Without any fine-tune (the decoder as trained, channels ≥ c' zeroed):", ""]
    md += _metric_table(at, sorted(at["plain"]))
    pairs = _recon_pairs(stages)
    if len(pairs) > 1:
        data = _psnr_by_seed(stages)
        md += ["", f"PSNR over {len(pairs)} AE seeds per kind (mean ± std; every AE with the same budget; the "
               "first table above is the seed the diffusion runs use):", "",
               "| c' | plain, fine-tuned | structured, fine-tuned | plain, as trained | structured, as trained |",
               "|---|---|---|---|---|"]
        for ch in sorted(data.get(("plain", "as_trained"), {})):
            cells = []
            for kind, part in (("plain", "finetuned"), ("structured", "finetuned"), ("plain", "as_trained"),
                               ("structured", "as_trained")):
                got = data.get((kind, part), {}).get(ch)
                cells.append(f"{np.mean(got):.2f} ± {np.std(got):.2f}" if got else "—")
            md.append(f"| {ch} | " + " | ".join(cells) + " |")
    md += ["", f"![Figure 3 grid](figures/{scale}_fig3_grid.png)", "",
           f"![PSNR vs c'](figures/{scale}_psnr_vs_channels.png)", ""]
    return md


def _table1_section(stages: dict[str, dict], sc: dict) -> list[str]:
    c, _, at = _recon_rows(stages)
    md = ["## Table 1: full-channel reconstruction", "",
          "| AE | latent | structured | PSNR | SSIM | proxy-LPIPS | proxy-rFID |", "|---|---|---|---|---|---|---|"]
    shape = "×".join(str(s) for s in stages["encode-plain"]["result"]["latent_shape"]) if "encode-plain" in stages else "?"
    for k in ("plain", "structured"):
        r = at[k][c]
        md.append(f"| {sc['ae_preset']} {k} | {shape} | {'✓' if k == 'structured' else '✗'} | {r['psnr']:.2f} | "
                  f"{r['ssim']:.3f} | {_f(r.get('proxy-lpips'), 3)} | {_f(r.get('proxy-rfid'), 3)} |")
    pairs = _recon_pairs(stages)
    if len(pairs) > 1:  # the same columns, mean ± std over the AE seeds
        for i, k in enumerate(("plain", "structured")):
            rows = [_rows_by_c(p[i]["as_trained"])[c] for p in pairs]
            cells = [f"{np.mean([x[m] for x in rows]):.{nd}f} ± {np.std([x[m] for x in rows]):.{nd}f}"
                     for m, nd in (("psnr", 2), ("ssim", 3), ("proxy-lpips", 3), ("proxy-rfid", 3))]
            md.append(f"| {sc['ae_preset']} {k}, {len(pairs)} AE seeds | {shape} | "
                      f"{'✓' if k == 'structured' else '✗'} | " + " | ".join(cells) + " |")
    md.append("")
    return md


def _mean_std_cells(per_seed: dict[int, list[tuple[int, float]]], steps: list[int]) -> list[str]:
    """``mean ± std`` over seeds at each step (``—`` where no seed has the step)."""
    cells = []
    for s in steps:
        vals = [dict(p)[s] for p in per_seed.values() if s in dict(p)]
        cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "—")
    return cells


def _final_per_seed_table(title: str, curves: dict, seeds: list[int]) -> list[str]:
    md = ["", title, "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for kind, adt, label in _VARIANTS:
        per = curves.get((kind, adt), {})
        md.append(f"| {label} | " + " | ".join(_f(per[s][-1][1], 3) if s in per else "—" for s in seeds) + " |")
    return md


def _table5_section(root: Path, stages: dict[str, dict], sc: dict, figs: Path, scale: str) -> list[str]:
    curves = _curves(stages)
    if not curves:
        return []
    _convergence_figure(stages, figs / f"{scale}_convergence.png")
    has_samples = _samples_figure(root, stages, sc, sc["seeds"][0], figs / f"{scale}_samples.png")
    steps_all = sorted({s for per in curves.values() for pts in per.values() for s, _ in pts})
    md = ["## Table 5 ablation: proxy-FID during diffusion training (mean ± std over seeds)", "",
          "| variant | SLS | ADT | " + " | ".join(f"step {s}" for s in steps_all) + " |",
          "|---|---|---|" + "---|" * len(steps_all)]
    for kind, adt, label in _VARIANTS:
        if (kind, adt) not in curves:
            continue
        md.append(f"| {label} | {'✓' if kind == 'structured' else '✗'} | {'✓' if adt else '✗'} | "
                  + " | ".join(_mean_std_cells(curves[(kind, adt)], steps_all)) + " |")
    acc = _curves(stages, "proxy-acc")
    if acc:
        md += ["", "Class accuracy of the samples (mean ± std over seeds; the fraction the proxy classifier "
               f"assigns to the class they were generated for; chance {1 / sc['num_classes']:.3f}):", "",
               "| variant | " + " | ".join(f"step {s}" for s in steps_all) + " |", "|---|" + "---|" * len(steps_all)]
        for kind, adt, label in _VARIANTS:
            per = acc.get((kind, adt))
            if per:
                md.append(f"| {label} | " + " | ".join(_mean_std_cells(per, steps_all)) + " |")
    md += _final_per_seed_table("Per seed, final proxy-FID:", curves, sc["seeds"])
    if acc:
        md += _final_per_seed_table("Per seed, final class accuracy:", acc, sc["seeds"])
    floors = {k: stages[f"floor-{k}"]["result"] for k in ("plain", "structured") if f"floor-{k}" in stages}
    if floors:
        md += ["", "Reference points on the same scale (same reference statistics, "
               f"{next(iter(floors.values()))['num_images']} images): real training images "
               f"{next(iter(floors.values()))['real_images_proxy_fid']:.3f}; the AEs' own reconstructions "
               "(what a perfect diffusion model would reach): "
               + ", ".join(f"{k} AE {f['reconstruction_proxy_fid']:.3f}" for k, f in floors.items()) + ". "
               "Proxy class accuracy: real images "
               f"{next(iter(floors.values())).get('real_images_proxy_acc', float('nan')):.3f}, reconstructions "
               + ", ".join(f"{k} AE {f.get('reconstruction_proxy_acc', float('nan')):.3f}"
                           for k, f in floors.items()) + "."]
    md += ["", f"![convergence](figures/{scale}_convergence.png)", ""]
    if has_samples:
        md += [f"![samples](figures/{scale}_samples.png)", ""]
    return md


def _structure_section(stages: dict[str, dict], figs: Path, scale: str) -> list[str]:
    se = stages.get("structure-eval")
    if not se:
        return []
    r = se["result"]
    md = ["## Secondary scorer: a 16 px proxy classifier (object structure, robust to blur)", "",
          f"`{r['extractor_label']}` trained at {r['resolution']} px (held-out accuracy "
          f"{r.get('held_out_accuracy', float('nan')):.3f}); the same saved samples re-scored. Floors: real "
          f"images FID {r['floor']['real']['fid']:.3f} / accuracy {r['floor']['real']['acc']:.3f}; "
          + "; ".join(f"{k} AE reconstructions FID {r['floor'][k]['fid']:.3f} / accuracy {r['floor'][k]['acc']:.3f}"
                      for k in ("plain", "structured") if k in r["floor"]) + ".", ""]
    for key, title in (("fid", "structure proxy-FID"), ("acc", "structure proxy class accuracy")):
        cur = _structure_curves(stages, key)
        steps_all = sorted({s for per in cur.values() for pts in per.values() for s, _ in pts})
        md += [f"{title} (mean ± std over seeds):", "",
               "| variant | " + " | ".join(f"step {s}" for s in steps_all) + " |", "|---|" + "---|" * len(steps_all)]
        for kind, adt, label in _VARIANTS:
            per = cur.get((kind, adt))
            if per:
                md.append(f"| {label} | " + " | ".join(_mean_std_cells(per, steps_all)) + " |")
        md.append("")
    _structure_figure(stages, figs / f"{scale}_convergence_structure_proxy.png")
    md += [f"![structure proxy](figures/{scale}_convergence_structure_proxy.png)", ""]
    return md


def _stage_times_section(stages: dict[str, dict]) -> list[str]:
    return ["## Stage times", "", "| stage | seconds |", "|---|---|",
            *(f"| {k} | {s['seconds']:.1f} |" for k, s in stages.items())]


def write_report(root: Path, stages: dict[str, dict], session: dict, results_dir: Path) -> dict:
    """Write ``RESULTS[-<scale>].md`` and ``figures/<scale>_*.png`` into ``results_dir``; returns the summary."""
    scale = session.get("tag") or session["scale"]
    results_dir.mkdir(parents=True, exist_ok=True)
    figs = results_dir / "figures"
    figs.mkdir(exist_ok=True)
    v = verdicts(stages)
    sc = session["scale_config"]
    # every scale or tag gets its own file; RESULTS.md is issue 21's channel sweep (experiments/channels_report.py)
    name = f"RESULTS-{scale}.md"
    total = sum(s["seconds"] for s in stages.values())
    md = _header_section(stages, session, scale, total) + _setting_section(stages, session) + _verdicts_section(v)
    if "recon-plain" in stages and "recon-structured" in stages:
        md += _fig3_section(stages, sc, figs, scale) + _table1_section(stages, sc)
    md += _table5_section(root, stages, sc, figs, scale)
    md += _structure_section(stages, figs, scale)
    md += _stage_times_section(stages)
    write_markdown(md, results_dir / name, results_dir / f"notes-{scale}.md")
    return {"verdicts": {k: x.get("held") for k, x in v.items()}, "results": str(results_dir / name),
            "details": v, "total_seconds": total}
