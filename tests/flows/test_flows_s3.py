"""`dcae15 demo --root s3://…` against the loopback S3 server: every artifact and Prefect's cached results live in
the bucket, and the rerun is served from that cache."""

from __future__ import annotations

import datetime as dt

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.s3]
PLUGIN = "examples.lightning_dit:lightning_dit_tiny"


def test_demo_command_on_s3_root_then_cached_rerun(prefect_api, s3_server, capsys, task_states_since):
    """Long (~40 s quiet): the one run of the user's command against an S3 root (the tiny config), where every
    artifact, every lease and Prefect's result cache go through s3fs; the storage tests cover S3 piece by piece.
    The one store serves a preset and a plug-in backbone side by side (docs/backbones.md): a run, samples and
    a results row each, the plug-in's row named by its import path. A good run logs no ERROR and prints no
    traceback (issue 34): every log record at ERROR or above, from any logger, fails the test."""
    import logging

    import s3fs

    from dcae15.metrics.results import read_results
    from flows.cli import main
    from storage.layout import Root

    root = s3_server.make_bucket() + "/dcae15"
    argv = ["demo", "--config", "tiny", "--root", root, "--backbones", "SiT-tiny", PLUGIN,
            "--set", "diffusion.train.objective=flow"]
    errors: list[str] = []

    class KeepErrors(logging.Handler):
        def emit(self, record):
            errors.append(f"{record.name}: {record.getMessage()}")

    keep = KeepErrors(level=logging.ERROR)
    # the root logger sees "prefect" and its children; these two do not propagate (Prefect's logging.yml), and
    # prefect._internal is where a failed service (e.g. a concurrency-slot acquisition) logs its ERROR
    loggers = [logging.getLogger(name) for name in ("", "prefect._internal", "prefect.extra")]
    for lg in loggers:
        lg.addHandler(keep)
    try:
        assert main(argv) == 0
    finally:
        for lg in loggers:
            lg.removeHandler(keep)
    out, err = capsys.readouterr()
    assert f"{root}/latents/" in out and "proxy-fid" in out
    assert not errors and "Traceback" not in out + err and "ERROR" not in out + err, (errors, err[-2000:])

    rows = read_results(Root(root).results()).rows()
    assert {r["backbone"] for r in rows} == {"SiT-tiny", PLUGIN}
    stores = {r["backbone"]: r["store"] for r in rows}
    assert stores["SiT-tiny"] == stores[PLUGIN] and f"{root}/latents/{stores[PLUGIN]}" in out  # one store serves both
    for backbone in ("SiT-tiny", PLUGIN):
        assert {r["metric"] for r in rows if r["backbone"] == backbone} >= {"proxy-fid", "proxy-class_accuracy"}

    fs = s3fs.S3FileSystem()
    bucket_path = root.removeprefix("s3://")
    for sub in ("data/shapes/dataset.json", "eval/results"):
        assert fs.exists(f"{bucket_path}/{sub}"), sub
    assert fs.glob(f"{bucket_path}/runs/diffusion/*/latest")
    assert fs.ls(f"{bucket_path}/prefect-results"), "cached task results must be persisted to the S3 result storage"

    t0 = dt.datetime.now(dt.timezone.utc)
    assert main(argv) == 0
    stages = {"pack_images", "fit_autoencoder", "encode_store", "fit_backbone", "draw_samples", "score_samples"}
    states = task_states_since(t0, stages)
    assert {k: set(states.get(k, ())) for k in stages} == {k: {"Cached"} for k in stages}, states  # per backbone
