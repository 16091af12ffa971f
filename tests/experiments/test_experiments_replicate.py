"""Smoke test of experiments/replicate.py: every stage on minimal budgets, the report, and a rerun that skips."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def replicate():
    if str(REPO) not in sys.path:  # experiments/ is a folder of scripts, not an installed package
        sys.path.insert(0, str(REPO))
    from experiments import replicate as mod

    return mod


@pytest.mark.slow
def test_replicate_smoke_runs_reports_and_resumes(replicate, tmp_path):
    root, results = tmp_path / "root", tmp_path / "results"
    summary = replicate.main(["--root", str(root), "--scale", "smoke", "--results-dir", str(results),
                              "--threads", "1"])

    # every stage finished and left its marker
    stages = {p.stem for p in (root / "stages").glob("*.json")}
    expected = {"data", "proxy", "ae-plain", "ae-structured", "recon-plain", "recon-structured", "encode-plain",
                "encode-structured", "floor-plain", "floor-structured", "structure-eval", "ae-plain-a1",
                "ae-structured-a1", "recon-plain-a1", "recon-structured-a1"} | {f"dit-{k}-{a}-s{s}" for k in ("plain", "structured")
                                        for a in ("adt", "noadt") for s in (0, 1)}
    assert stages == expected

    # the two AEs really differ in how they were trained, with the same budget
    cfg = {k: json.loads((root / "stages" / f"ae-{k}.json").read_text())["result"]["config"]
           for k in ("plain", "structured")}
    assert cfg["plain"]["structured"] is False and cfg["structured"]["structured"] is True
    assert {k: v for k, v in cfg["plain"].items() if k != "structured"} == \
        {k: v for k, v in cfg["structured"].items() if k != "structured"}

    # a proxy-FID at every checkpoint of every diffusion run, finite
    for name in expected - {"data", "proxy", "ae-plain", "ae-structured", "recon-plain", "recon-structured",
                            "encode-plain", "encode-structured", "floor-plain", "floor-structured", "structure-eval",
                            "ae-plain-a1", "ae-structured-a1", "recon-plain-a1", "recon-structured-a1"}:
        curve = json.loads((root / "stages" / f"{name}.json").read_text())["result"]["curve"]
        assert [p["step"] for p in curve] == [2, 4]
        assert all(math.isfinite(p["proxy-fid"]) and 0.0 <= p["proxy-acc"] <= 1.0 for p in curve)

    # the report states a verdict for each claim and draws the figures
    assert set(summary["verdicts"]) == {"fig3_partial", "fig3_partial_no_ft", "table1_full", "table5_speed",
                                        "table5_alone", "table5_speed_acc", "table5_alone_acc",
                                        "table5_speed_structure_proxy", "table5_alone_structure_proxy"}
    # class accuracy at every checkpoint too, and a spread over seeds in the table 5 verdicts
    reach = summary["details"]["table5_speed_acc"]["reach"]["plain AE, no ADT (baseline)"]
    assert 0.0 <= reach["final_min"] <= reach["final_mean"] <= reach["final_max"] <= 1.0 and reach["final_std"] >= 0
    assert "improves" in summary["details"]["table5_speed"]["baseline_curve"]
    # Figure 3 / Table 1 over two AE seeds (the extra seed's AEs have the same budget)
    assert summary["details"]["table1_full"]["ae_seeds"] == 2
    assert len(summary["details"]["fig3_partial"]["gain"]["per_seed"]) == 2
    text = (results / "RESULTS-smoke.md").read_text()
    for title in ("Figure 3 (first quarter", "no decoder fine-tune", "Table 1 (full channels",
                  "Table 5 on proxy-FID (SLS + ADT", "Table 5 on class accuracy", "No GPU was lent"):
        assert title in text
    for fig in ("fig3_grid", "psnr_vs_channels", "convergence", "samples"):
        assert (results / "figures" / f"smoke_{fig}.png").stat().st_size > 1000

    # a rerun skips every finished stage (markers untouched) and a lost marker is recomputed
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")}
    (root / "stages" / "dit-structured-adt-s1.json").unlink()
    again = replicate.main(["--root", str(root), "--scale", "smoke", "--results-dir", str(results),
                            "--threads", "1"])
    after = {p.name: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")}
    assert set(after) == set(mtimes)
    assert {k: v for k, v in after.items() if k != "dit-structured-adt-s1.json"} == \
        {k: v for k, v in mtimes.items() if k != "dit-structured-adt-s1.json"}
    assert again["details"]["table5_speed"]["reach"] == summary["details"]["table5_speed"]["reach"]
