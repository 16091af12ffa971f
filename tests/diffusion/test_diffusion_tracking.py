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


def _wandb_run(path):
    """The W&B run id, group, job type and config an offline ``.wandb`` file was written for (its ``run``
    record)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    pos = 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 1:  # the run record is small: a FULL record near the start
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data[pos + 7:pos + 7 + length])
            if rec.WhichOneof("record_type") == "run":
                config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
                return rec.run.run_id, rec.run.run_group, rec.run.job_type, config
        pos += 7 + length
    raise AssertionError(f"no run record in {path}")


def test_evaluations_out_of_order_survive_in_wandb_and_tensorboard(tmp_path, monkeypatch):
    """Issue 31 item 5: training logs steps 10..30; two evaluation writers (other processes in real life) log
    checkpoint 20 and then checkpoint 10, lower than the run's step, and the training writer logs again between
    them. W&B: each evaluation is its own run (``wandb sync`` of several offline runs under one id keeps one),
    grouped by the training run, whose id stays the run id; every offline run's history, read back from its
    file, holds its own ``eval/step`` and values and nothing of the others. TensorBoard: every (tag, step) of the
    writers reads back from the one run."""
    pytest.importorskip("wandb")
    import yaml

    from dcae15.tracking import eval_wandb_id, log_evaluation, open_tracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    for backend in ("wandb", "tensorboard"):
        cfg = {"backend": backend, "project": "dcae15-test", "offline": True}
        run = tmp_path / backend / "run"
        run.mkdir(parents=True)
        # log_evaluation reads the run's tracker from its config.yaml, as the evaluation flow does
        (run / "config.yaml").write_text(yaml.safe_dump({"run_id": "USiT-tiny-ooo", "train": {"logging": cfg}}))
        with open_tracker(cfg, run_url=str(run), run_id="USiT-tiny-ooo") as tr:
            for step in (10, 20, 30):
                tr.log_metrics({"loss": 1.0 / step}, step, prefix="train/")
        # the sweep scores the older checkpoint last; training goes on between the two evaluations
        assert log_evaluation(str(run), 20, values={"fid": 5.0},
                              images={"samples": np.full((4, 4, 3), 20, np.uint8)}) == backend
        with open_tracker(cfg, run_url=str(run), run_id="USiT-tiny-ooo") as tr:
            tr.log_metrics({"loss": 1.0 / 40}, 40, prefix="train/")
        log_evaluation(str(run), 10, values={"fid": 9.0}, images={"samples": np.full((4, 4, 3), 10, np.uint8)})
    files = glob.glob(str(tmp_path / "wandb" / "run" / "tracking" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 4  # one offline run per writer
    runs = {}
    for f in files:
        run_id, group, job_type, config = _wandb_run(f)
        metrics = {}
        runs.setdefault(run_id, []).append((group, job_type, config, _wandb_records(f, metrics), metrics))
    label = "fid+samples"  # log_evaluation's default label: the names it logs
    ev10, ev20 = eval_wandb_id("USiT-tiny-ooo", 10, label), eval_wandb_id("USiT-tiny-ooo", 20, label)
    assert ev10 == "USiT-tiny-ooo-eval-10-" + ev10.rsplit("-", 1)[-1] and ev10 != ev20
    # the training run keeps its id (its two writers resume it); each evaluation is a distinct W&B run
    assert sorted(runs) == sorted(["USiT-tiny-ooo", ev10, ev20]) and len(runs["USiT-tiny-ooo"]) == 2
    assert {(g, j) for g, j, *_ in runs["USiT-tiny-ooo"]} == {("USiT-tiny-ooo", "train")}  # the group of all three
    train = [(r["_step"], r["train/loss"]) for *_, rows, _ in runs["USiT-tiny-ooo"] for r in rows if "train/loss" in r]
    assert sorted(s for s, _ in train) == [10, 20, 30, 40]
    assert not any("eval/fid" in r for *_, rows, _ in runs["USiT-tiny-ooo"] for r in rows)
    for wid, step, fid in ((ev20, 20, 5.0), (ev10, 10, 9.0)):
        ((group, job_type, config, rows, metrics),) = runs[wid]
        assert (group, job_type) == ("USiT-tiny-ooo", "eval")
        assert config["checkpoint_step"] == step and config["run_id"] == "USiT-tiny-ooo"
        assert [(r["eval/step"], r["eval/fid"]) for r in rows if "eval/fid" in r] == [(step, fid)]
        assert [r["eval/step"] for r in rows if "eval/samples/_type" in r] == [step]
        assert not any("train/loss" in r for r in rows)
        assert metrics["eval/*"] == "eval/step"
    scalars, images = _tb_scalars(str(tmp_path / "tensorboard" / "run" / "tracking" / "tensorboard"))
    assert sorted(scalars["eval/fid"]) == [(10, 9.0), (20, 5.0)] and len(scalars["train/loss"]) == 4
    assert images == ["eval/samples"]


def test_eval_wandb_id_is_deterministic_and_fits():
    from dcae15.tracking import eval_wandb_id

    assert eval_wandb_id("DiT-XL-2-abc", 400000, "0123456789ab") == "DiT-XL-2-abc-eval-400000-0123456789ab"
    assert eval_wandb_id("r", 1, "grid") == eval_wandb_id("r", 1, "grid") != eval_wandb_id("r", 1, "fid")
    long = eval_wandb_id("x" * 80, 7, "a label: with spaces")
    assert len(long) == 64 and "-eval-7-" in long and " " not in long


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
