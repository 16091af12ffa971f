"""Experiment tracking read back from what each backend wrote: TensorBoard event files (a real training run and
its evaluation), a W&B offline run directory, an MLflow file store (when mlflow is installed)."""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}, tags["images"]


def test_config_is_checked():
    from dcae15.tracking import TrackingConfig, open_tracker

    with pytest.raises(ValueError, match="logging.backend='tb'; allowed: none, tensorboard, wandb, mlflow"):
        TrackingConfig(backend="tb")
    assert open_tracker({"backend": "tensorboard"}, run_url="/x", run_id="r", rank=1).backend == "none"


def test_training_and_evaluation_land_in_tensorboard(tmp_path, tiny_run_factory):
    from dcae15.tracking import log_evaluation

    run_url = tiny_run_factory(tmp_path, model="SiT-tiny", n=32, global_batch_size=8, steps=4, log_every=2,
                               logging={"backend": "tensorboard"})
    grid = np.full((12, 20, 3), 200, np.uint8)
    assert log_evaluation(run_url, 4, values={"fid": 12.5, "run_id": "x"}, images={"samples": grid}) == "tensorboard"
    scalars, images = _tb_scalars(str(tmp_path / "run" / "tracking" / "tensorboard"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == [2, 4] == [r["step"] for r in rows]
    # metrics.jsonl holds the float64 window mean, TensorBoard its float32 rounding: <= u32 = 6e-8 relative; rtol 1e-6
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in rows], rtol=1e-6)
    for tag in ("train/grad_norm", "train/lr", "train/c_prime", "train/img_per_s"):
        assert len(scalars[tag]) == 2, tag
    assert scalars["eval/fid"] == [(4, 12.5)] and images == ["eval/samples"]


def _wandb_records(path, metrics=None):
    """History rows of a W&B offline ``.wandb`` file (LevelDB log format: 32 KiB blocks of CRC/length/type records)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL / LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif rec.WhichOneof("record_type") == "metric" and metrics is not None:
                metrics[rec.metric.glob_name or rec.metric.name] = rec.metric.step_metric
    return rows


def test_wandb_offline_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from dcae15.tracking import open_tracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    with open_tracker({"backend": "wandb", "project": "dcae15-test", "offline": True}, run_url=str(tmp_path / "run"),
                      run_id="DiT-tiny-abc", config={"lr": 1e-3}) as tr:
        tr.log_metrics({"loss": 0.5, "lr": 1e-3, "channels": "x"}, 10, prefix="train/")
        tr.log_metrics({"fid": 7.0}, 20, prefix="eval/")
        tr.log_image("eval/samples", np.zeros((8, 8, 3), np.uint8), 20)
    (path,) = glob.glob(str(tmp_path / "run" / "tracking" / "wandb" / "offline-run-*-DiT-tiny-abc" / "run-*.wandb"))
    metrics = {}
    rows = _wandb_records(path, metrics)
    # W&B may put an eval row into the row of the pending training step; what counts is that it is not logged at
    # an explicit (droppable) step and carries its checkpoint as eval/step
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(10, 0.5)]
    assert [(r["eval/fid"], r["eval/step"]) for r in rows if "eval/fid" in r] == [(7.0, 20)]
    assert [(r["eval/samples/_type"], r["eval/step"]) for r in rows if "eval/samples/_type" in r] == [("image-file", 20)]
    assert metrics["eval/*"] == "eval/step"  # eval numbers are plotted against the checkpoint step


def test_evaluations_out_of_order_survive_in_wandb_and_tensorboard(tmp_path, monkeypatch):
    """Issue 31 item 5: training logs steps 10..30, then two evaluation writers (other processes in real life)
    log checkpoint 20 and then checkpoint 10, lower than the run's step. W&B: each evaluation row carries its
    checkpoint as ``eval/step`` and no explicit step (W&B drops explicit steps lower than the run's), in every
    writer's offline file; TensorBoard: every (tag, step) of the three writers reads back."""
    pytest.importorskip("wandb")
    from dcae15.tracking import open_tracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    for backend in ("wandb", "tensorboard"):
        cfg = {"backend": backend, "project": "dcae15-test", "offline": True}
        run = str(tmp_path / backend / "run")
        with open_tracker(cfg, run_url=run, run_id="USiT-tiny-ooo") as tr:
            for step in (10, 20, 30):
                tr.log_metrics({"loss": 1.0 / step}, step, prefix="train/")
        for step, fid in ((20, 5.0), (10, 9.0)):  # the sweep scores the older checkpoint last
            with open_tracker(cfg, run_url=run, run_id="USiT-tiny-ooo") as tr:
                tr.log_metrics({"fid": fid}, step, prefix="eval/")
                tr.log_image("eval/samples", np.full((4, 4, 3), step, np.uint8), step)
    files = sorted(glob.glob(str(tmp_path / "wandb" / "run" / "tracking" / "wandb" / "offline-run-*" / "run-*.wandb")),
                   key=lambda f: os.path.getmtime(f))
    assert len(files) == 3  # one offline run file per writer, all for the same W&B run id
    rows, metrics = [], {}
    for f in files:
        rows += _wandb_records(f, metrics)
    train = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["eval/step"], r["eval/fid"]) for r in rows if "eval/fid" in r]
    assert [s for s, _ in train] == [10, 20, 30] and np.allclose([v for _, v in train], [0.1, 0.05, 1.0 / 30])
    assert sorted(evals) == [(10, 9.0), (20, 5.0)]
    assert metrics["eval/*"] == "eval/step"
    scalars, images = _tb_scalars(str(tmp_path / "tensorboard" / "run" / "tracking" / "tensorboard"))
    assert sorted(scalars["eval/fid"]) == [(10, 9.0), (20, 5.0)] and len(scalars["train/loss"]) == 3
    assert images == ["eval/samples"]


def test_mlflow_local_store(tmp_path):
    from mlflow.tracking import MlflowClient  # the dev extra installs it: a documented backend is a tested one

    from dcae15.tracking import open_tracker

    for step in (1, 2):  # a second tracker (the evaluation) finds the same MLflow run by its dcae15 run id
        with open_tracker({"backend": "mlflow", "project": "dcae15-test"}, run_url=str(tmp_path / "run"),
                          run_id="r1") as tr:
            tr.log_metrics({"loss": 1.0 / step}, step, prefix="train/")
            tr.log_image("samples", np.zeros((4, 4, 3), np.uint8), step)
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "run" / "tracking" / "mlflow.db"))
    (run,) = client.search_runs([client.get_experiment_by_name("dcae15-test").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 1.0), (2, 0.5)]
    assert run.info.artifact_uri.startswith((tmp_path / "run" / "tracking" / "mlartifacts").as_uri())
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert arts == {"samples/step-0000001.png", "samples/step-0000002.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "samples"}


def test_pipeline_logging_section_feeds_every_trainer():
    from flows.config import load_config

    cfg = load_config("tiny", {"logging": {"backend": "tensorboard", "project": "lab"}})
    assert cfg.diffusion.train.logging.backend == "tensorboard"
    assert {p.logging.project for p in cfg.autoencoder.phases} == {"lab"}
    from dcae15.diffusion.train import run_id_for

    assert run_id_for(cfg.diffusion.train, "s") == run_id_for(load_config("tiny", {}).diffusion.train, "s")  # operational
    with pytest.raises(ValueError, match="diffusion.train.logging: logging.backend='tb'"):
        load_config("tiny", {"diffusion": {"train": {"logging": {"backend": "tb"}}}})
