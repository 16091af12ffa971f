"""`dcae15 demo --root s3://…` against the loopback S3 server: every artifact and Prefect's cached results live in
the bucket, and the rerun is served from that cache."""

from __future__ import annotations

import datetime as dt

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def test_demo_command_on_s3_root_then_cached_rerun(prefect_api, s3_server, capsys, task_states_since):
    """Long (~30 s quiet): the one run of the user's command against an S3 root (the tiny config), where every
    artifact, every lease and Prefect's result cache go through s3fs; the storage tests cover S3 piece by piece."""
    import s3fs

    from flows.cli import main

    root = s3_server.make_bucket() + "/dcae15"
    argv = ["demo", "--config", "tiny", "--root", root]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{root}/latents/" in out and "proxy-fid" in out

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
    assert {k: states.get(k) for k in stages} == {k: ["Cached"] for k in stages}, states
