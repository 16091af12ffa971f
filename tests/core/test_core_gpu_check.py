"""bash bench/gpu_check.sh --cpu-smoke (the documented command): every section of the GPU check runs (tiny sizes, the GPU branches on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_section():
    """The documented GPU command (`bash bench/gpu_check.sh --cpu-smoke`) runs every section in this environment.
    Long (~25 s quiet): it is the command the lent GPU machine runs, section by section; .ci/run's rehearsal runs
    it again in a bare environment (the GPU image's packages only), which this test cannot."""
    # the documented command; its python3 is this interpreter, as the image's python3 is the one with torch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for var in ("DCAE15_GPU_BRANCHES", "PYTHONPATH"):
        env.pop(var, None)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    by = {r["section"]: r for r in lines}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(by) == ["env", "timesteps", "dit_step", "train_e2e", "encode", "sampling", "ae_step", "reader",
                        "total"]
    assert all(r["status"] == "ok" for s, r in by.items() if s != "total"), lines
    assert by["env"]["gpu_branches"] and by["env"]["pg_backend"] == "gloo"
    assert by["timesteps"]["ok"] and by["timesteps"]["param_dtype"] == "torch.bfloat16"
    runs = by["dit_step"]["runs"]
    assert [(r["compile"], r["batch"], r["fsdp"]) for r in runs] == [(False, 4, False), (False, 8, False),
                                                                     (True, 4, False), (True, 8, False),
                                                                     (False, 4, True)]  # + the sharded step
    assert by["env"]["float32_matmul_precision"] in ("highest", "high")  # the legacy getters answer
    assert all(r["loss_finite"] and r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in runs)
    assert by["train_e2e"]["resumed_at"] == 2 and by["train_e2e"]["done"] and by["train_e2e"]["finite"]
    assert by["train_e2e"]["resumed_sharded_call_s"] > 0
    assert 0 < by["encode"]["bf16_latent_rel_error"] < 0.05
    assert by["sampling"]["ddpm_3_img_s"] > 0 and by["sampling"]["heun_2_img_s"] > 0
    assert by["reader"]["feed_img_s"] > 0 and by["total"]["failures"] == 0


def test_a_section_past_its_deadline_is_cut():
    """A section that would run 60 s is cut at its 0.2 s deadline by SectionTimeout."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("gpu_check", None)
    t0 = time.perf_counter()
    with pytest.raises(mod.SectionTimeout, match="deadline"):
        with mod.deadline(0.2):
            time.sleep(60)
    # cut, not run to its end: 30 s is far below the 60 s the section would take and far above any scheduling delay
    assert time.perf_counter() - t0 < 30
