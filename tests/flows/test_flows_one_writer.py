"""One writer per artifact in flow runs (flows/claims.py): two flow runs of one artifact on one Prefect API never
write at once — the second waits in the artifact's concurrency slot / storage lease — and a refusal is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

FLOW = textwrap.dedent("""
    import json, sys, time
    from prefect import flow, task
    from flows.claims import ArtifactKey, artifact_stage

    @task
    @artifact_stage(lambda url, hold: ArtifactKey("test artifact", url, "abc123"))
    def write(url, hold):
        t0 = time.time()
        time.sleep(hold)
        return [t0, time.time()]

    @flow
    def two_writers(url: str, hold: float):
        return write(url, hold)

    print("RESULT " + json.dumps(two_writers(sys.argv[1], float(sys.argv[2]))), flush=True)
""")


def _two_commands_meeting_at(artifact_url: str, what: str, cmd: list[str], env: dict) -> tuple[list, list[str]]:
    """Start `cmd` twice while the test holds the artifact's lease; release it once a command says it waits, so
    both reach the released lease together. Returns the finished processes and their logs."""
    from storage.lease import LeaseConfig, claim

    logs: list[list[str]] = [[], []]
    with claim(artifact_url, what=what, config=LeaseConfig(ttl=30)):
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
                   for p, out in zip(procs, logs)]
        for r in readers:
            r.start()
        deadline = time.time() + 240
        while not any(f"waiting: {what}" in line for out in logs for line in list(out)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), ["".join(o) for o in logs]
            time.sleep(0.2)
    for p in procs:
        p.wait(timeout=300)
    for r in readers:
        r.join(timeout=30)
    return procs, ["".join(out) for out in logs]


def test_two_flow_runs_of_one_artifact_write_one_after_the_other(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.claims import artifact_limit_name

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": os.getcwd(), "PREFECT_LOGGING_LEVEL": "INFO",
           "DCAE15_SLOT_WAIT_SECONDS": "60"}
    art = str(tmp_path / "artifacts" / "one")
    # each body holds 15 s: longer than the spread of two Prefect client starts, so the two always meet
    procs = [subprocess.Popen([sys.executable, "-c", FLOW, art, "15"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    (a0, a1), (b0, b1) = sorted(json.loads(log.strip().splitlines()[-1].removeprefix("RESULT ")) for log in logs)
    assert a1 <= b0, logs  # never both inside the body
    # the second said why it waited (on a loaded machine the first may say so too: its first 2 s try can time out)
    assert any("waiting: another flow run holds the Prefect slot of test artifact abc123" in log for log in logs)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(artifact_limit_name("test artifact", "abc123"))
    assert limit.limit == 1 and limit.active_slots == 0


def test_two_encode_commands_at_once_one_encodes_the_other_finds_the_store(prefect_api, tmp_path):
    """The issue's first report: two `dcae15 encode` of one dataset and AE at the same moment (one died with
    zarr's ContainsArrayError). Now one encodes, the other waits and then finds every unit done."""
    import torch

    from dcae15.ae.model import StructuredAutoencoder
    from storage import synthetic
    from storage.latent_store import LatentStore
    from storage.layout import Root
    from storage.shards import pack_image_folder

    root = Root(str(tmp_path / "root"))
    synthetic.make_shapes_dataset(root.raw_images("shapes"), num_classes=4, per_class=8, size=32, seed=0)
    dataset = root.dataset("shapes")
    pack_image_folder(root.raw_images("shapes"), dataset, name="shapes", progress=False)
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32").save_pretrained(str(tmp_path / "ae"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": os.getcwd(), "PREFECT_LOGGING_LEVEL": "INFO",
           "OMP_NUM_THREADS": "1", "DCAE15_LEASE_SECONDS": "5"}
    cmd = [sys.executable, "-m", "flows.cli", "encode", "--config", "tiny", "--root", root.url, "--ae", ae,
           "--dataset", dataset, "--results", str(tmp_path / "results")]
    # A tiny encode takes ~2 s, less than a CLI's start: two commands started together need not overlap (on an
    # idle machine the first finished before the second began). So the test holds the store's lease itself until
    # a command has reached it and said it waits; both commands then meet at the released lease at once.
    from flows.claims import latent_store_key
    from flows.pointers import describe_ae, describe_dataset

    key = latent_store_key(root.url, describe_ae(ae), describe_dataset(dataset), {"resolution": 32, "flip": True})
    procs, logs = _two_commands_meeting_at(key.url, "latent store", cmd, env)
    assert all(p.returncode == 0 for p in procs), logs
    assert not any("Traceback" in log or "ContainsArrayError" in log for log in logs), logs
    # one encoded both units, the other (after its wait) found them done
    assert sorted(("2 of 2 units to encode" in log, "0 of 2 units to encode" in log) for log in logs) == \
        [(False, True), (True, False)], logs
    (store_url,) = root.latent_stores()
    store = LatentStore.open(store_url, read_only=True)
    assert store.is_complete and store.verify()["ok"]
    from storage.lease import Lease

    assert Lease(store_url).holder() is None  # released


@pytest.mark.s3
def test_two_evaluate_commands_of_one_sample_store_on_s3_write_one_row(prefect_api, tmp_path, s3_server):
    """Two `dcae15 evaluate` of the same checkpoint's samples at once, on the moto S3 server: one computes the
    reference statistics and scores, the other waits on the evaluation row and then finds it; the results table
    holds the row once."""
    import dataclasses

    from dcae15.metrics.inputs import load_labelled_images
    from dcae15.metrics.results import part_url, read_results
    from flows.config import load_config
    from flows.evaluate import _row_key, extractor_for, reference_label
    from flows.pointers import describe_samples, results_url
    from storage import synthetic
    from storage.fingerprint import short_id
    from storage.layout import Root
    from storage.sample_store import SampleStore
    from storage.shards import pack_image_folder
    from storage.urls import join

    root = Root(s3_server.make_bucket() + "/root")
    src = tmp_path / "shapes"
    synthetic.make_shapes_dataset(str(src), num_classes=4, per_class=8, size=32, seed=0)
    dataset = root.dataset("shapes")
    pack_image_folder(str(src), dataset, name="shapes", progress=False)
    # a checkpoint's samples: here real images under the attributes the sampler writes (sampling is tested apart)
    images, labels, _ = load_labelled_images(dataset, resolution=32)
    samples = join(root.url, "samples", "ckpt-10")
    store = SampleStore.create(samples, num_samples=len(images), height=32, width=32, chunk_size=16, attrs={
        "run_id": "run-x", "backbone": "SiT-tiny", "checkpoint_step": 10, "sampler": "heun", "steps": 4,
        "cfg_scale": 2.0, "labels": "uniform", "seed": 0})
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        store.write_unit(u, images[a:b], labels[a:b].astype(np.int64))
    ev = dataclasses.asdict(load_config("tiny", {"root": root.url}).evaluate)
    extractor = extractor_for(ev, dataset)  # trains the proxy classifier here, once (its own claim is tested apart)
    row = short_id(_row_key(describe_samples(samples), extractor.label, reference_label(ev)))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": os.getcwd(), "PREFECT_LOGGING_LEVEL": "INFO",
           "OMP_NUM_THREADS": "1", "DCAE15_LEASE_SECONDS": "5"}
    cmd = [sys.executable, "-m", "flows.cli", "evaluate", "--config", "tiny", "--root", root.url,
           "--samples", samples, "--dataset", dataset]
    # as in the encode test: the test holds the row until a command waits for it, so the two always meet
    procs, logs = _two_commands_meeting_at(part_url(results_url(root.url), row), "evaluation row", cmd, env)
    assert all(p.returncode == 0 for p in procs), logs
    assert not any("Traceback" in log for log in logs), logs
    assert sorted("scored run-x step 10" in log for log in logs) == [False, True], logs  # one scored, one found it
    table = read_results(results_url(root.url))
    assert int(((table["run_id"] == "run-x") & (table["metric"] == "proxy-fid")).sum()) == 1
