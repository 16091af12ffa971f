"""One writer per artifact in flow runs: the artifact's lease (storage/lease.py) is the only claim. Two flow runs or
two identical `dcae15` commands of one artifact never write at once (the second waits, says so once, then finds the
result), a rerun after a `kill -9` of the holder takes over, and none of it prints an ERROR or a traceback.

No test here depends on timing between processes: the commands meet at the lease, held by the test until each one
has said it waits (a line `claim` always prints once when it meets a held lease), or at a lease a killed holder left.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.concurrency]

FLOW = textwrap.dedent("""
    import json, sys, time
    from prefect import flow, get_run_logger, task
    from storage.lease import claim

    @task
    def write(url):
        with claim(url, what="test artifact", log=get_run_logger().info):
            t0 = time.time()
            time.sleep(0.2)  # a body that lasts: the two intervals below are never empty
            return [t0, time.time()]

    @flow
    def two_writers(url: str):
        return write(url)

    print("RESULT " + json.dumps(two_writers(sys.argv[1])), flush=True)
""")


def _quiet(logs: list[str]) -> None:
    """A good run prints no ERROR and no traceback (issue 34), whatever ran beside it."""
    for log in logs:
        assert "ERROR" not in log and "Traceback" not in log, log


def _env(prefect_api: str, **extra: str) -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": os.getcwd(), "PREFECT_LOGGING_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A packed shapes dataset of 32 images (2 units of a store at the tiny config's chunk size) and a tiny AE."""
    import torch

    from dcae15.ae.model import StructuredAutoencoder
    from storage import synthetic
    from storage.layout import Root
    from storage.shards import pack_image_folder

    base = tmp_path_factory.mktemp("one-writer")
    root = Root(str(base / "data-root"))
    synthetic.make_shapes_dataset(root.raw_images("shapes"), num_classes=4, per_class=8, size=32, seed=0)
    dataset = root.dataset("shapes")
    pack_image_folder(root.raw_images("shapes"), dataset, name="shapes", progress=False)
    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32").save_pretrained(str(base / "ae"))
    return dataset, ae


def _encode_cmd(root: str, ae: str, dataset: str, results: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "encode", "--config", "tiny", "--root", root, "--ae", ae,
            "--dataset", dataset, "--results", results]


def _store_url(root: str, ae: str, dataset: str) -> str:
    from flows.encode import latent_store_url
    from flows.pointers import describe_ae, describe_dataset

    return latent_store_url(root, describe_ae(ae), describe_dataset(dataset), {"resolution": 32, "flip": True})


def test_two_flow_runs_of_one_artifact_write_one_after_the_other(prefect_api, tmp_path, meet_at_lease):
    from prefect.client.orchestration import get_client

    art = str(tmp_path / "artifacts" / "one")
    codes, logs = meet_at_lease(art, "test artifact", [sys.executable, "-c", FLOW, art], _env(prefect_api))
    assert codes == [0, 0], logs
    (a0, a1), (b0, b1) = sorted(json.loads(log.strip().splitlines()[-1].removeprefix("RESULT ")) for log in logs)
    assert a1 <= b0, logs  # never both inside the body
    # each said once that it waits, although the second waited twice (for the test, then for the first)
    assert [log.count("waiting: test artifact") for log in logs] == [1, 1], logs
    _quiet(logs)
    with get_client(sync_client=True) as client:  # the lease is the only claim: no Prefect limit per artifact
        assert not [lim.name for lim in client.read_global_concurrency_limits(limit=200)
                    if lim.name.startswith("dcae15-") and not lim.name.startswith("dcae15-gpu-")]


def test_two_encode_commands_at_once_one_encodes_the_other_finds_the_store(prefect_api, tmp_path, packed,
                                                                           meet_at_lease):
    """The issue's first report: two `dcae15 encode` of one dataset and AE at the same moment (one died with
    zarr's ContainsArrayError). Now one encodes, the other waits and then finds every unit done."""
    from storage.latent_store import LatentStore
    from storage.layout import Root
    from storage.lease import Lease

    dataset, ae = packed
    root = Root(str(tmp_path / "root"))
    cmd = _encode_cmd(root.url, ae, dataset, str(tmp_path / "results"))
    # A tiny encode takes ~2 s, less than a CLI's start: two commands started together need not overlap. So the
    # test holds the store's lease until both commands have reached it; they then meet at the released lease.
    codes, logs = meet_at_lease(_store_url(root.url, ae, dataset), "latent store", cmd,
                                _env(prefect_api, DCAE15_LEASE_SECONDS="15"))
    assert codes == [0, 0], logs
    assert not any("Traceback" in log or "ContainsArrayError" in log for log in logs), logs
    _quiet(logs)
    # one encoded both units, the other (after its wait) found them done
    assert sorted(("2 of 2 units to encode" in log, "0 of 2 units to encode" in log) for log in logs) == \
        [(False, True), (True, False)], logs
    (store_url,) = root.latent_stores()
    store = LatentStore.open(store_url, read_only=True)
    assert store.is_complete and store.verify()["ok"]
    assert Lease(store_url).holder() is None  # released


def test_encode_after_a_killed_encode_takes_over_once_without_noise(prefect_api, tmp_path, packed, commands):
    """`kill -9` of an encode that holds the store; its lease then made to look like another machine's, so that only
    its expiry frees it. The rerun says once that it waits, takes over once when the lease expires (the test expires
    it once the rerun waits: no race with the rerun's start), ends with a complete store, and prints neither an
    ERROR line nor a traceback (it used to wait on the dead run's Prefect slot and print an IntegrityError)."""
    import time

    from storage.latent_store import LatentStore
    from storage.lease import Lease, lease_url
    from storage.urls import write_atomic

    dataset, ae = packed
    root = str(tmp_path / "root")
    store_url = _store_url(root, ae, dataset)
    cmd = _encode_cmd(root, ae, dataset, str(tmp_path / "results"))
    first = commands([cmd], _env(prefect_api))
    holder, lease = first.procs[0], Lease(store_url)
    deadline = time.monotonic() + 300
    while (lease.holder() or {}).get("pid") != holder.pid:  # the lease file the holder writes: it holds the store
        assert holder.poll() is None and time.monotonic() < deadline, first.logs
        time.sleep(0.05)
    holder.send_signal(signal.SIGKILL)
    first.finish()

    def left_by_the_killed_holder(expires: float) -> None:  # written whole (a rename): read as old or new, never torn
        now = time.time()
        write_atomic(lease_url(store_url), json.dumps({
            "holder": f"pid {holder.pid} on another-machine", "token": "t-killed", "host": "another-machine",
            "artifact": f"latent store {store_url}", "pid": holder.pid, "acquired": now, "renewed": now,
            "expires": expires}).encode())

    left_by_the_killed_holder(time.time() + 3600)
    rerun = commands([cmd], _env(prefect_api, DCAE15_LEASE_SECONDS="6"))
    rerun.until(lambda logs: "waiting: latent store" in logs[0])
    left_by_the_killed_holder(time.time())  # its lease expires now
    (log,) = rerun.finish()
    assert rerun.returncodes == [0], log
    _quiet([log])
    assert log.count("waiting: latent store") == 1 and "expires in" in log, log
    assert log.count("took over latent store") == 1, log
    store = LatentStore.open(store_url, read_only=True)
    assert store.is_complete and store.verify()["ok"]
    assert lease.holder() is None


def _random_store(url: str) -> str:
    """A small finalized random latent store (training does not care where latents came from)."""
    from tests.diffusion.conftest import make_latent_store

    return make_latent_store(url, n=64, c=8, hw=4, num_classes=4, unit=16, flip=False)


def test_two_train_diffusion_commands_at_once_train_one_run(tmp_path, meet_at_lease):
    """Two identical `dcae15 train-diffusion` at once, as a user starts them: no Prefect API, so each starts its
    own temporary server on the one database of their Prefect home. One trains, the other waits, then finds the run
    finished; no traceback from the servers (they used to race to create the same concurrency limit)."""
    from flows.config import load_config
    from flows.pointers import describe_store, run_url_for
    from storage.rundir import RunDir

    root = str(tmp_path / "root")
    store = _random_store(str(tmp_path / "root" / "latents" / "store"))
    train = {**load_config("tiny", {"root": root}).diffusion.train.to_dict(), "model": "DiT-tiny"}
    run_url = run_url_for(root, describe_store(store)["store_id"], "DiT-tiny", train, train["seed"])
    cmd = [sys.executable, "-m", "flows.cli", "train-diffusion", "--config", "tiny", "--root", root, "--store", store,
           "--backbone", "DiT-tiny", "--results", str(tmp_path / "results")]
    env = {k: v for k, v in _env("", DCAE15_LEASE_SECONDS="15").items() if k != "PREFECT_API_URL"}
    codes, logs = meet_at_lease(run_url, "diffusion run", cmd, {**env, "PREFECT_HOME": str(tmp_path / "prefect-home")})
    assert codes == [0, 0], logs
    _quiet(logs)
    assert [log.count("waiting: diffusion run") for log in logs] == [1, 1], logs
    assert RunDir(run_url).latest()["step"] == train["steps"]


@pytest.mark.s3
def test_two_evaluate_commands_of_one_sample_store_on_s3_write_one_row(prefect_api, tmp_path, s3_server,
                                                                        meet_at_lease):
    """Two `dcae15 evaluate` of the same checkpoint's samples at once, on the moto S3 server: one computes the
    reference statistics and scores, the other waits on the evaluation row and then finds it; the results table
    holds the row once."""
    import dataclasses

    from dcae15.metrics.inputs import load_labelled_images
    from dcae15.metrics.results import part_url, read_results
    from flows.config import load_config
    from flows.evaluate import _row_key, extractor_for, protocol_of, reference_label
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
    row = short_id(_row_key(describe_samples(samples), extractor.label, reference_label(ev), protocol_of(ev)))
    cmd = [sys.executable, "-m", "flows.cli", "evaluate", "--config", "tiny", "--root", root.url,
           "--samples", samples, "--dataset", dataset]
    # as in the encode test: the test holds the row until both commands wait for it, so the two always meet
    codes, logs = meet_at_lease(part_url(results_url(root.url), row), "evaluation row", cmd,
                                _env(prefect_api, DCAE15_LEASE_SECONDS="15"))
    assert codes == [0, 0], logs
    assert not any("Traceback" in log for log in logs), logs
    _quiet(logs)
    assert sorted("scored run-x step 10" in log for log in logs) == [False, True], logs  # one scored, one found it
    table = read_results(results_url(root.url))
    assert int(((table["run_id"] == "run-x") & (table["metric"] == "proxy-fid")).sum()) == 1
