"""Issue 32's decision rules for the ``fmnist-wide`` sweep, declared before any run (see ``claims-wide.md``)."""

from __future__ import annotations

__all__ = ["CLAIMS_WIDE", "TARGETS_WIDE", "READINGS", "PRIMARY", "OLD_VERDICTS", "reading_key", "run_name", "collect",
           "evaluate"]

#: The verdicts, declared before any run (issue 32) and not tuned toward; ``evaluate`` computes exactly these.
CLAIMS_WIDE = {
    "fig1b_generation_wide": "with a backbone wider than the token at every c, the plain c = {c_max} model's final "
                             "FID is worse than c = {c_min}'s beyond the seed spread (else: the toy Figure 1b was an "
                             "artefact of the head width)",
    "table5_speed_wide": "at c = {c_max}, wide backbone: SLS + ADT reaches the baseline's final FID in <= 1/{speedup} "
                         "of the steps the baseline first needs (else, where the old sweep held: the toy Table 5 "
                         "was an artefact of the head width)",
    "table5_alone_wide": "at c = {c_max}, wide backbone: neither SLS alone nor ADT alone does so",
    "table5_recipe_speed": "rule table5_speed_wide with the paper's recipe (literal c' list 16, 20, ..., c and "
                           "include_full on, in the AE and in ADT)",
    "table5_recipe_alone": "rule table5_alone_wide with the paper's recipe",
    "table1_recipe": "at c = {c_max}, the recipe-structured AE's full-channel PSNR is within {full_psnr_gap_db} dB of "
                     "the plain AE's (mean over AE seeds)",
    "table1_recipe_explains": "the recipe's full-channel gap is >= {recipe_gain_db} dB smaller in magnitude than the "
                              "scaled c' list's gap (same budget and AE seeds)",
    "table6_fmnist": "at c = {c_small}, SLS + ADT's final FID is not better than plain's beyond the seed spread "
                     "(the paper's Table 6 direction)",
    "tradeoff_leaves_curve": "SLS + ADT at c = {c_max} has a final FID below the plain AEs' PSNR-vs-FID curve at its "
                             "own PSNR beyond the seed spread (the curve held constant beyond its end points)",
    "judge_accuracy": "the independent judge's held-out accuracy on real Fashion-MNIST is >= {judge_accuracy}",
    "head_width_ok": "every diffusion run has hidden width > token dimension p^2 c (no output direction constant)",
}
TARGETS_WIDE = {"speedup": 2.0, "full_psnr_gap_db": 0.5, "recipe_gain_db": 1.0, "judge_accuracy": 0.9}

#: (judge, CFG) readings of every generation verdict; the first is the primary one that decides.
READINGS = (("judge", 1.0), ("judge", 2.5), ("proxy", 1.0), ("proxy", 2.5))
PRIMARY = READINGS[0]
FALLBACK = READINGS[2]
"""The reading that decides when the judge misses its accuracy target (verdicts then marked ``weak_judge``)."""

#: The old, confounded ``fmnist`` sweep's verdicts as recorded in RESULTS.md (issue 21), for the artefact rule.
OLD_VERDICTS = {"fig1b_generation": True, "table5_speed": True, "table5_alone": False, "table1": False}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on recorded inputs (no runs): ``collect`` turns a root's markers into this shape
# ---------------------------------------------------------------------------------------------------------------
#
# recorded = {
#   "curves": {run name: {"judge@1": [{"step", "fid", "acc"}, ...], "judge@2.5": [...], "proxy@1": ..., ...}},
#   "psnr": {AE name: full-channel PSNR},          e.g. "plain-c64-a0", "recipe-c64-a1"
#   "judge": {"held_out_accuracy": float} or None,
#   "heads": {run name: {"hidden": H, "patch": p, "channels": c}},
# }
# Run names: ``<kind>-c<c>-a<a>-<adt>-s<seed>`` with kind plain / structured / recipe and adt noadt / adt / adtfull.


def reading_key(judge: str, cfg: float) -> str:
    """``judge@1``, ``proxy@2.5``: one (judge, CFG) reading of a run's curve."""
    return f"{judge}@{cfg:g}"


def run_name(kind: str, c: int, a: int, adt: str, seed: int) -> str:
    return f"{kind}-c{c}-a{a}-{adt}-s{seed}"


def _stats(vals: list[float]) -> dict | None:
    if not vals:
        return None
    v = [float(x) for x in vals]
    m = sum(v) / len(v)
    return {"mean": m, "std": (sum((x - m) ** 2 for x in v) / len(v)) ** 0.5, "n": len(v)}


def _curves(rec: dict, names: list[str], key: str) -> list[list[dict]] | None:
    """The runs' curves of one reading; None if any run (or its reading) is missing."""
    out = []
    for n in names:
        pts = rec.get("curves", {}).get(n, {}).get(key)
        if not pts:
            return None
        out.append(sorted(pts, key=lambda p: p["step"]))
    return out


def _final(curves: list[list[dict]] | None, metric: str) -> dict | None:
    return None if curves is None else _stats([c[-1][metric] for c in curves])


def _mean_curve(curves: list[list[dict]], metric: str) -> list[tuple[int, float]]:
    """Seed-mean curve over the steps every run has."""
    steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves]))
    return [(s, sum(next(p[metric] for p in c if p["step"] == s) for c in curves) / len(curves)) for s in steps]


def _better(a: float, b: float, metric: str) -> bool:
    """a at least as good as b (FID: lower; accuracy: higher)."""
    return a <= b if metric == "fid" else a >= b


def _beyond(worse: dict, better: dict, metric: str) -> bool:
    """``worse`` is worse than ``better`` by more than the sum of their std's."""
    gap = worse["mean"] - better["mean"] if metric == "fid" else better["mean"] - worse["mean"]
    return gap > worse["std"] + better["std"]


def _first_reach(curve: list[tuple[int, float]], target: float, metric: str) -> int | None:
    return next((s for s, v in curve if _better(v, target, metric)), None)


def _seeds(rec: dict, kind: str, c: int, a: int, adt: str, seeds: tuple[int, ...]) -> list[str]:
    return [run_name(kind, c, a, adt, s) for s in seeds]


def fig1b(rec: dict, key: str, channels: tuple[int, ...], seeds: tuple[int, ...], metric: str = "fid") -> dict:
    """Rule 1 on one reading: plain c_max worse than plain c_min beyond the seed spread."""
    per_c = {c: _final(_curves(rec, _seeds(rec, "plain", c, 0, "noadt", seeds), key), metric) for c in channels}
    lo, hi = min(channels), max(channels)
    if per_c[lo] is None or per_c[hi] is None:
        return {"held": None, "per_c": per_c}
    worse = [c for c in channels if c != lo and per_c[c] is not None and _beyond(per_c[c], per_c[lo], metric)]
    return {"held": _beyond(per_c[hi], per_c[lo], metric), "per_c": per_c, "worse_than_smallest": worse}


def table5(rec: dict, key: str, c: int, seeds: tuple[int, ...], *, sls: str, adt: str, speedup: float,
           metric: str = "fid") -> dict:
    """Rules 2 / 3 on one reading: (speed held, alone held, details). ``sls`` = structured / recipe; ``adt`` =
    adt / adtfull (the ADT variant that goes with it)."""
    variants = {"baseline": ("plain", "noadt"), "adt_alone": ("plain", adt), "sls_alone": (sls, "noadt"),
                "sls_adt": (sls, adt)}
    curves = {v: _curves(rec, _seeds(rec, k, c, 0, t, seeds), key) for v, (k, t) in variants.items()}
    if curves["baseline"] is None:
        return {"speed": None, "alone": None}
    base = _mean_curve(curves["baseline"], metric)
    target = base[-1][1]
    base_step = _first_reach(base, target, metric)
    limit = base_step / speedup
    reach = {v: (None if cv is None else _first_reach(_mean_curve(cv, metric), target, metric))
             for v, cv in curves.items()}
    fast = {v: (None if curves[v] is None else (reach[v] is not None and reach[v] <= limit)) for v in variants}
    alone = None if fast["adt_alone"] is None or fast["sls_alone"] is None else not (fast["adt_alone"] or
                                                                                      fast["sls_alone"])
    finals = {v: _final(cv, metric) for v, cv in curves.items()}
    better_final = (None if finals["sls_adt"] is None else _beyond(finals["baseline"], finals["sls_adt"], metric))
    return {"speed": fast["sls_adt"], "alone": alone, "target": target, "baseline_step": base_step, "limit": limit,
            "reach": reach, "final": finals, "better_final": better_final}


def table1(rec: dict, c: int, ae_seeds: tuple[int, ...], kind: str) -> dict | None:
    """Full-channel PSNR gap (``kind`` - plain) over AE seeds; None if any AE is missing."""
    gaps = []
    for a in ae_seeds:
        s, p = rec.get("psnr", {}).get(f"{kind}-c{c}-a{a}"), rec.get("psnr", {}).get(f"plain-c{c}-a{a}")
        if s is None or p is None:
            return None
        gaps.append(s - p)
    return _stats(gaps)


def table6(rec: dict, key: str, c: int, seeds: tuple[int, ...], metric: str = "fid") -> dict:
    """Rule 5 on one reading: SLS + ADT at small c is NOT better than plain beyond the seed spread."""
    plain = _final(_curves(rec, _seeds(rec, "plain", c, 0, "noadt", seeds), key), metric)
    sls = _final(_curves(rec, _seeds(rec, "structured", c, 0, "adt", seeds), key), metric)
    if plain is None or sls is None:
        return {"held": None}
    return {"held": not _beyond(plain, sls, metric), "plain": plain, "sls_adt": sls}


def tradeoff(rec: dict, key: str, channels: tuple[int, ...], seeds: tuple[int, ...], *, sls: str, adt: str,
             metric: str = "fid") -> dict:
    """Rule 6 on one reading: the SLS + ADT point at c_max below the plain AEs' PSNR-vs-FID curve beyond the spread."""
    pts = []
    for c in channels:
        f = _final(_curves(rec, _seeds(rec, "plain", c, 0, "noadt", seeds), key), metric)
        p = rec.get("psnr", {}).get(f"plain-c{c}-a0")
        if f is None or p is None:
            return {"held": None}
        pts.append((p, f))
    pts.sort(key=lambda t: t[0])
    cm = max(channels)
    me = _final(_curves(rec, _seeds(rec, sls, cm, 0, adt, seeds), key), metric)
    x = rec.get("psnr", {}).get(f"{sls}-c{cm}-a0")
    if me is None or x is None:
        return {"held": None}
    if x <= pts[0][0]:
        curve = {"mean": pts[0][1]["mean"], "std": pts[0][1]["std"]}
    elif x >= pts[-1][0]:
        curve = {"mean": pts[-1][1]["mean"], "std": pts[-1][1]["std"]}
    else:
        i = next(i for i in range(1, len(pts)) if pts[i][0] >= x)
        (x0, f0), (x1, f1) = pts[i - 1], pts[i]
        w = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
        curve = {"mean": f0["mean"] + w * (f1["mean"] - f0["mean"]), "std": max(f0["std"], f1["std"])}
    return {"held": _beyond(curve, me, metric), "psnr": x, "point": me, "curve_at_psnr": curve,
            "plain_points": [{"psnr": p, **f} for p, f in pts]}


def evaluate(rec: dict, *, channels: tuple[int, ...], seeds: tuple[int, ...], ae_seeds: tuple[int, ...],
             small_c: int, targets: dict = TARGETS_WIDE, old_held: dict | None = OLD_VERDICTS) -> dict[str, dict]:
    """Every rule of ``CLAIMS_WIDE`` on recorded inputs: {rule: {"claim", "held" (primary reading; None = not
    measured), "readings": {key: details}, "agree": whether all measured readings agree, "artefact": (rules 1/2)
    True where the old sweep held and this one does not}}."""
    cm, cmin = max(channels), min(channels)
    fmt = dict(targets, c_max=cm, c_min=cmin, c_small=small_c)
    out: dict[str, dict] = {k: {"claim": v.format(**fmt), "held": None} for k, v in CLAIMS_WIDE.items()}
    judge = rec.get("judge")
    weak = judge is not None and judge["held_out_accuracy"] < targets["judge_accuracy"]
    primary = reading_key(*(FALLBACK if weak else PRIMARY))

    def put(rule: str, per_key: dict[str, dict], field: str = "held") -> None:
        vals = {k: d.get(field) for k, d in per_key.items()}
        measured = [v for v in vals.values() if v is not None]
        out[rule].update(held=vals[primary], reading=primary, readings=per_key, weak_judge=weak,
                         agree=(len(set(measured)) <= 1) if measured else None)

    keys = [reading_key(*r) for r in READINGS]
    put("fig1b_generation_wide", {k: fig1b(rec, k, channels, seeds) for k in keys})
    for rule, sls, adt in (("table5", "structured", "adt"), ("table5_recipe", "recipe", "adtfull")):
        per = {k: table5(rec, k, cm, seeds, sls=sls, adt=adt, speedup=targets["speedup"]) for k in keys}
        speed, alone = ("table5_speed_wide", "table5_alone_wide") if rule == "table5" else \
            ("table5_recipe_speed", "table5_recipe_alone")
        put(speed, per, "speed")
        put(alone, per, "alone")
    gap_r, gap_s = table1(rec, cm, ae_seeds, "recipe"), table1(rec, cm, ae_seeds, "structured")
    if gap_r is not None:
        out["table1_recipe"].update(held=abs(gap_r["mean"]) <= targets["full_psnr_gap_db"], gap=gap_r)
        if gap_s is not None:
            out["table1_recipe_explains"].update(
                held=abs(gap_r["mean"]) <= abs(gap_s["mean"]) - targets["recipe_gain_db"], gap=gap_r, scaled_gap=gap_s)
    put("table6_fmnist", {k: table6(rec, k, small_c, seeds) for k in keys})
    per_t = {k: tradeoff(rec, k, channels, seeds, sls="structured", adt="adt") for k in keys}
    per_r = {k: tradeoff(rec, k, channels, seeds, sls="recipe", adt="adtfull") for k in keys}
    put("tradeoff_leaves_curve", per_t)
    out["tradeoff_leaves_curve"]["recipe"] = per_r
    if judge is not None:
        out["judge_accuracy"].update(held=judge["held_out_accuracy"] >= targets["judge_accuracy"],
                                     accuracy=judge["held_out_accuracy"])
    heads = rec.get("heads") or {}
    if heads:
        narrow = sorted(n for n, h in heads.items() if h["hidden"] <= h["patch"] ** 2 * h["channels"])
        out["head_width_ok"].update(held=not narrow, narrow=narrow)
    for rule, old in (("fig1b_generation_wide", "fig1b_generation"), ("table5_speed_wide", "table5_speed"),
                      ("table5_recipe_speed", "table5_speed")):
        if old_held is not None and old in old_held and out[rule]["held"] is not None:
            out[rule]["artefact"] = bool(old_held[old]) and not out[rule]["held"]
    return out


def collect(stages: dict[str, dict]) -> dict:
    """The recorded shape above from a ``fmnist-wide`` root's markers ({name: {"result", "seconds"}}: judge-*, recon-*,
    judge, floor-*, jfloor-*)."""
    rec: dict = {"curves": {}, "psnr": {}, "judge": None, "heads": {}, "floors": {}}
    for name, m in stages.items():
        r = m["result"]
        if name.startswith("judge-"):
            rec["curves"][name[len("judge-"):]] = r["curves"]
            rec["heads"][name[len("judge-"):]] = r["head"]
        elif name.startswith("recon-"):
            rows = r["rows"]
            full = max(rows, key=lambda x: x["channels"])
            rec["psnr"][name[len("recon-"):]] = float(full["psnr"])
        elif name == "judge":
            rec["judge"] = {"held_out_accuracy": float(r["held_out_accuracy"]), "label": r["extractor_label"]}
        elif name.startswith(("floor-", "jfloor-")):
            rec["floors"].setdefault(name.split("-", 1)[1], {}).update(r)
    return rec
