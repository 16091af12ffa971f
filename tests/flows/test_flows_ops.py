"""Operating the flows: DataLoader workers forked inside a flow run, artifacts and run names read back from the API,
the checkpoint event, the GPU work-pool template and the heartbeat automation files."""

from __future__ import annotations

import numpy as np
import pytest

from storage.latent_store import LatentStore


def _latent_store(url: str, *, n: int = 64, c: int = 8, hw: int = 4, num_classes: int = 4, unit: int = 16) -> str:
    """A finalized random store written through storage's API (tests/diffusion has a richer one)."""
    rng = np.random.default_rng(0)
    st = LatentStore.create(url, num_samples=n, channels=c, height=hw, width=hw, flip=False, chunk_size=unit,
                            attrs={"ae_fingerprint": "ae-test", "dataset_fingerprint": "ds-test",
                                   "resolution": hw * 8, "ae_scaling_factor": 1.0, "num_classes": num_classes})
    for u in range(st.num_units):
        a, b = st.unit_bounds(u)
        labels = rng.integers(0, num_classes, b - a)
        st.write_unit(u, rng.standard_normal((b - a, c, hw, hw)).astype(np.float32), labels, np.ones(b - a, bool), None)
    st.finalize()
    return url


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    return _latent_store(str(tmp_path_factory.mktemp("ops") / "latents" / "store"))


def _wait_for(fetch, ok, timeout: float = 30.0):
    """Poll ``fetch()`` until ``ok(result)`` (Prefect records artifacts and events asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = fetch()
        if ok(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # the trainer's loader dies in __del__
def test_training_with_two_loader_workers_inside_a_flow_run(prefect_api, tmp_path, results_dir, tiny_config,
                                                            small_store):
    """DataLoader workers forked in a process that runs Prefect flows used to exit 1 with no traceback (Prefect's
    queue services' threading-atexit hooks failed in the child; see flows/forksafe.py). The same run is then read
    back through the Prefect client: its name, its artifacts and its checkpoint events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter

    from dcae15.diffusion_train import latest_checkpoint
    from flows.artifacts import artifact_key
    from flows.diffusion import train_diffusion
    from flows.events import CHECKPOINT_SAVED

    cfg = tiny_config(tmp_path / "root", diffusion={"train": {"steps": 4, "checkpoint_every": 2, "num_workers": 2,
                                                               "log_every": 1}})
    state = train_diffusion.with_options(result_storage=results_dir)(
        store=small_store, backbone="DiT-tiny", root=str(tmp_path / "root"), config=cfg, return_state=True)
    out = state.result()
    assert out["step"] == 4 and latest_checkpoint(out["url"])[0] == 4

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.name == "train DiT-tiny on store"
        keys = [artifact_key("train", out["run_id"]), artifact_key("progress-train", out["run_id"])]
        arts = _wait_for(lambda: client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))),
                         lambda a: {x.key for x in a} == set(keys))
        by_type = {a.type: a for a in arts}
        assert out["url"] in by_type["markdown"].data and out["checkpoint"] in by_type["markdown"].data
        assert by_type["progress"].data == 100.0
        run_res = f"dcae15.run.{out['run_id']}"
        page = _wait_for(lambda: client.read_events(EventFilter(event=EventNameFilter(name=[CHECKPOINT_SAVED])),
                                                    limit=50),
                         lambda p: len([e for e in p.events if e.resource.id == run_res]) >= 2)
    events = sorted((e for e in page.events if e.resource.id == run_res), key=lambda e: int(e.resource["dcae15.step"]))
    assert [int(e.resource["dcae15.step"]) for e in events] == [2, 4]  # one event per committed checkpoint
    assert events[-1].resource["dcae15.checkpoint-url"] == out["checkpoint"]
    assert events[-1].payload["run_url"] == out["url"] and events[-1].payload["config"]["root"] == cfg["root"]


def test_a_process_forked_inside_a_flow_run_exits_cleanly(prefect_api):
    """The root cause, without torch: a forked multiprocessing child of a Prefect client exited with status 1."""
    import multiprocessing

    from prefect import flow

    @flow(name="fork_a_child")
    def fork_a_child() -> int:
        child = multiprocessing.get_context("fork").Process(target=int)
        child.start()
        child.join(30)
        return child.exitcode

    assert fork_a_child() == 0
