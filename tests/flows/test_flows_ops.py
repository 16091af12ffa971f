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


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # the trainer's loader dies in __del__
def test_training_with_two_loader_workers_inside_a_flow_run(prefect_api, tmp_path, results_dir, tiny_config,
                                                            small_store):
    """DataLoader workers forked in a process that runs Prefect flows used to exit 1 with no traceback (Prefect's
    queue services' threading-atexit hooks failed in the child; see flows/forksafe.py)."""
    from dcae15.diffusion_train import latest_checkpoint
    from flows.diffusion import train_diffusion

    cfg = tiny_config(tmp_path / "root", diffusion={"train": {"steps": 4, "checkpoint_every": 2, "num_workers": 2,
                                                               "log_every": 1}})
    out = train_diffusion.with_options(result_storage=results_dir)(store=small_store, backbone="DiT-tiny",
                                                                        root=str(tmp_path / "root"), config=cfg)
    assert out["step"] == 4 and latest_checkpoint(out["url"])[0] == 4


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
