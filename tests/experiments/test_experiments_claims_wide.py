"""experiments/claims_wide.py (issue 32): every declared rule evaluated on recorded inputs (no runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # experiments/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from experiments.claims_wide import CLAIMS_WIDE, evaluate, reading_key, run_name  # noqa: E402

CH, SEEDS, STEPS = (8, 16, 32, 64), (0, 1, 2), (100, 200, 300, 400, 500, 600)
KEYS = [reading_key(j, g) for j in ("judge", "proxy") for g in (1.0, 2.5)]


def _curve(final: float, start: float, jitter: float) -> list[dict]:
    """A falling FID curve from ``start`` to ``final`` (+ a per-seed offset); accuracy mirrors it."""
    pts = []
    for i, s in enumerate(STEPS):
        f = start + (final - start) * i / (len(STEPS) - 1) + jitter
        pts.append({"step": s, "fid": f, "acc": 1.0 - f / 100})
    return pts


def _record(finals: dict[tuple[str, int, str], tuple[float, float]], psnr: dict[str, float],
            acc: float = 0.93) -> dict:
    """finals: (kind, c, adt) -> (final FID, first-checkpoint FID); seeds jitter by -0.1, 0, +0.1."""
    curves = {}
    for (kind, c, adt), (final, start) in finals.items():
        for s in SEEDS:
            curves[run_name(kind, c, 0, adt, s)] = {k: _curve(final, start, 0.1 * (s - 1)) for k in KEYS}
    heads = {n: {"hidden": 96, "patch": 1, "channels": int(n.split("-c")[1].split("-")[0])} for n in curves}
    return {"curves": curves, "psnr": psnr, "judge": {"held_out_accuracy": acc}, "heads": heads}


PSNR = {"plain-c8-a0": 25.0, "plain-c16-a0": 25.6, "plain-c32-a0": 26.2, "plain-c64-a0": 27.0,
        "plain-c64-a1": 27.1, "structured-c64-a0": 23.7, "structured-c64-a1": 23.8, "recipe-c64-a0": 26.8,
        "recipe-c64-a1": 26.7}


def _world(*, degrade: bool, fast: bool) -> dict:
    flat = {c: 5.0 + (3.0 * (c > 8) if degrade else 0.0) for c in CH}
    f = {("plain", c, "noadt"): (flat[c], flat[c] + 4) for c in CH}
    base = f[("plain", 64, "noadt")][0]
    combo = (base - 5, base - 1) if fast else (base + 0.5, base + 4)
    f.update({("plain", 64, "adt"): (base, base + 4), ("structured", 64, "noadt"): (base, base + 4),
              ("structured", 64, "adt"): combo, ("plain", 64, "adtfull"): (base, base + 4),
              ("recipe", 64, "noadt"): (base + 0.2, base + 4), ("recipe", 64, "adtfull"): combo,
              ("structured", 8, "adt"): (flat[8] + 0.3, flat[8] + 4)})
    return _record(f, PSNR)


def _eval(rec: dict) -> dict:
    return evaluate(rec, channels=CH, seeds=SEEDS, ae_seeds=(0, 1), small_c=8)


def test_head_width_artefact_reading_when_the_wide_backbone_stops_degrading():
    v = _eval(_world(degrade=False, fast=False))
    assert set(v) == set(CLAIMS_WIDE)
    assert v["fig1b_generation_wide"]["held"] is False and v["fig1b_generation_wide"]["artefact"] is True
    assert v["table5_speed_wide"]["held"] is False and v["table5_speed_wide"]["artefact"] is True
    assert v["fig1b_generation_wide"]["agree"] is True and v["fig1b_generation_wide"]["reading"] == "judge@1"
    assert v["judge_accuracy"]["held"] is True and v["head_width_ok"]["held"] is True
    assert v["tradeoff_leaves_curve"]["held"] is False  # worse reconstruction, no better generation: on the curve


def test_claims_survive_when_the_wide_backbone_still_degrades_and_sls_adt_is_fast():
    v = _eval(_world(degrade=True, fast=True))
    fig = v["fig1b_generation_wide"]
    assert fig["held"] is True and fig["artefact"] is False
    assert fig["readings"]["judge@1"]["worse_than_smallest"] == [16, 32, 64]
    t5 = v["table5_speed_wide"]
    assert t5["held"] is True and v["table5_alone_wide"]["held"] is True
    assert t5["readings"]["judge@1"]["baseline_step"] == 600 and t5["readings"]["judge@1"]["reach"]["sls_adt"] == 100
    assert v["table5_recipe_speed"]["held"] is True and v["table5_recipe_alone"]["held"] is True
    # SLS + ADT (PSNR 23.7, below every plain AE) at FID 3 beats c = 8 (FID 5) beyond the spread: leaves the curve
    assert v["tradeoff_leaves_curve"]["held"] is True
    # c = 8: SLS + ADT 0.3 worse than plain -> not better: the paper's Table 6 direction
    assert v["table6_fmnist"]["held"] is True


def test_table1_recipe_rules_and_missing_runs():
    v = _eval(_world(degrade=True, fast=True))
    assert v["table1_recipe"]["held"] is True and v["table1_recipe"]["gap"]["mean"] == pytest.approx(-0.3)
    assert v["table1_recipe_explains"]["held"] is True  # |-0.3| <= |-3.3| - 1
    rec = _world(degrade=True, fast=True)
    del rec["psnr"]["recipe-c64-a1"]
    for n in [n for n in rec["curves"] if n.startswith("recipe-")]:
        del rec["curves"][n]
    v = _eval(rec)
    assert v["table1_recipe"]["held"] is None and v["table5_recipe_speed"]["held"] is None
    assert v["table5_speed_wide"]["held"] is True  # the other rules still read


def test_weak_judge_falls_back_to_the_proxy_and_narrow_heads_are_flagged():
    rec = _world(degrade=True, fast=True)
    rec["judge"] = {"held_out_accuracy": 0.85}
    rec["heads"]["plain-c64-a0-noadt-s0"] = {"hidden": 96, "patch": 2, "channels": 64}
    v = _eval(rec)
    assert v["judge_accuracy"]["held"] is False
    assert v["fig1b_generation_wide"]["reading"] == "proxy@1" and v["fig1b_generation_wide"]["weak_judge"]
    assert v["head_width_ok"]["held"] is False and v["head_width_ok"]["narrow"] == ["plain-c64-a0-noadt-s0"]


def test_table6_contradicted_when_sls_adt_clearly_helps_at_small_c():
    rec = _world(degrade=True, fast=True)
    for s in SEEDS:
        for k in KEYS:
            rec["curves"][run_name("structured", 8, 0, "adt", s)][k] = _curve(3.0, 7.0, 0.1 * (s - 1))
    assert _eval(rec)["table6_fmnist"]["held"] is False


def test_results_md_gets_the_summary_on_top_and_the_old_report_marked_once(tmp_path):
    """RESULTS.md (issue 32, item 6): the wide sweep's summary and verdicts on top, the old report kept below a
    'confounded' note; a second report replaces its block instead of stacking, and the old sweep's report
    regenerated afterwards keeps it."""
    from experiments.channels_wide_report import CONFOUNDED, WIDE_BEGIN, mark_old_results, restore_head

    old = "# DC-AE 1.5 where its claim lives (issue 21)\n\n- `fig1b_generation` — **HELD**: ...\n"
    path = tmp_path / "RESULTS.md"
    path.write_text(old)
    v = _eval(_world(degrade=False, fast=False))
    first = mark_old_results(path, v)
    assert first.startswith(WIDE_BEGIN) and first.endswith(old) and first.count(CONFOUNDED) == 1
    assert "**Contradicted**" in first and "`fig1b_generation_wide` — **DID NOT HOLD** — the old toy result was an " \
           "artefact of the head width" in first
    v2 = _eval(_world(degrade=True, fast=True))
    second = mark_old_results(path, v2)
    assert second.count(WIDE_BEGIN) == 1 and second.count(CONFOUNDED) == 1 and second.endswith(old)
    assert "`fig1b_generation_wide` — **HELD**" in second
    path.write_text(old.replace("HELD", "HELD (regenerated)"))  # the old sweep's report rewrites the file
    restore_head(path, second)
    again = path.read_text()
    assert again.startswith(WIDE_BEGIN) and again.count(CONFOUNDED) == 1 and again.endswith("**HELD (regenerated)**: ...\n")
