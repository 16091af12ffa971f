"""storage.rundir: one run-directory protocol (identity, metrics, checkpoints, latest last, done) and one identity
rule (operational fields and steps are not identity)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage.rundir import HORIZON, OPERATIONAL, RunDir, RunMismatchError, identity


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    steps: int = dataclasses.field(default=10, metadata=HORIZON)
    log_every: int = dataclasses.field(default=1, metadata=OPERATIONAL)


def test_identity_leaves_out_operational_fields_and_steps():
    assert identity(_Cfg()) == {"lr": 1e-3}
    assert identity(_Cfg(steps=99, log_every=7)) == identity(_Cfg())
    assert identity(_Cfg(), keep_horizon=True) == {"lr": 1e-3, "steps": 10}
    assert identity(_Cfg(lr=2e-3)) != identity(_Cfg())


@pytest.mark.parametrize("where", ["local", "memory"])
def test_run_directory_protocol(tmp_path, where):
    url = str(tmp_path / "run") if where == "local" else "memory://rundir-test/run"
    run = RunDir(url, kind="test", checkpoint_suffix=".pt")
    assert run.config() is None and run.latest() is None and run.metrics() == [] and run.done() is None
    run.claim("id-1", {"config": {"lr": 1}})
    run.claim("id-1", {"config": {"lr": 1, "log_every": 5}})  # the same identity may rewrite its config
    assert run.config() == {"identity": "id-1", "config": {"lr": 1, "log_every": 5}}
    with pytest.raises(RunMismatchError, match="belongs to another run .*'id-1'.*'id-2'.*fresh run directory"):
        run.claim("id-2", {})
    legacy = RunDir(f"{url}-old")
    legacy.write(b"config: {}\n", "config.yaml")  # a run folder of an older dcae15 (no identity recorded)
    with pytest.raises(RunMismatchError, match="older dcae15.*fresh run directory"):
        legacy.claim("id-1", {})
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    for step in (2, 4, 6):
        run.write(b"payload", "checkpoints", run.checkpoint_name(step))
    run.publish(4, rows + [{"step": 5, "loss": 0.1}])  # rows past the checkpoint are not published
    assert run.latest() == {"step": 4, "checkpoint": f"{run.url}/checkpoints/step-0000004.pt"}
    assert run.metrics() == rows and run.metrics(upto=2) == rows[:2]
    assert run.checkpoints() == [2, 4, 6]
    run.drop_partial(4)  # step 6 was never named by latest: an interrupted save
    run.prune(keep=1, latest_step=4)
    assert run.checkpoints() == [4]
    run.finish({"steps": 4})
    assert run.done() == {"steps": 4}


def test_latest_is_written_after_the_metrics(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "r"))
    order = []
    real = RunDir.write
    monkeypatch.setattr(RunDir, "write", lambda self, data, *parts: (order.append(parts[-1]), real(self, data, *parts)))
    run.publish(1, [{"step": 1}])
    assert order == ["metrics.jsonl", "latest"]
    assert json.loads((tmp_path / "r" / "latest").read_text()) == {"step": 1, "checkpoint": "checkpoints/step-0000001"}


def test_storage_layout_and_rundir_import_no_torch():
    code = "import sys, storage.rundir, storage.layout, storage.urls; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
