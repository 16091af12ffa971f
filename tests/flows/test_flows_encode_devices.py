"""The encode flow's choice of cluster, on CPU: one worker per visible GPU (own CUDA_VISIBLE_DEVICES), one named
GPU, a clear error without GPUs, CPU workers otherwise."""

from __future__ import annotations

import contextlib

import pytest

WHERE = {"scheduler": None, "workers": 3, "processes": True, "units_per_task": 1, "decode_threads": 2,
         "prefetch_batches": 4}


@pytest.fixture
def started(monkeypatch):
    """Record what dask_client would start instead of starting it."""
    import storage.cluster

    calls = []

    @contextlib.contextmanager
    def fake(scheduler=None, workers=1, *, processes=True, worker_envs=None):
        calls.append({"scheduler": scheduler, "workers": workers, "worker_envs": worker_envs})
        yield None

    monkeypatch.setattr(storage.cluster, "dask_client", fake)
    return calls


def test_encode_client_pins_one_worker_per_gpu(started, monkeypatch):
    import dcae15.ae.encode
    from flows.encode import encode_client

    monkeypatch.setattr(dcae15.ae.encode, "visible_gpus", lambda: ["2", "5", "7"])
    with encode_client({**WHERE, "device": "cuda"}):
        pass
    with encode_client({**WHERE, "device": "cuda:1"}):
        pass
    with encode_client({**WHERE, "device": "cpu"}):
        pass
    assert [[e["CUDA_VISIBLE_DEVICES"] for e in c["worker_envs"]] for c in started[:2]] == [["2", "5", "7"], ["5"]]
    assert started[2] == {"scheduler": None, "workers": 3, "worker_envs": None}

    monkeypatch.setattr(dcae15.ae.encode, "visible_gpus", lambda: [])
    with pytest.raises(ValueError, match="no GPU is visible"):
        with encode_client({**WHERE, "device": "cuda"}):
            pass
    monkeypatch.setattr(dcae15.ae.encode, "visible_gpus", lambda: ["0"])
    with pytest.raises(ValueError, match="only 1 GPUs"):
        with encode_client({**WHERE, "device": "cuda:3"}):
            pass


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch):
    from dcae15.ae.encode import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-ab12")
    assert visible_gpus() == ["3", "GPU-ab12"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


@pytest.mark.filterwarnings("ignore:Couldn't detect a suitable IP address")  # in-process cluster: no IP needed
def test_a_running_cluster_is_used_as_it_is(tmp_path):
    """Any scheduler address works for packing and for the encode client (here: an in-process cluster)."""
    from dask.distributed import LocalCluster

    from flows.encode import encode_client
    from storage.packing import pack_image_folder
    from storage.synthetic import make_shapes_dataset

    make_shapes_dataset(str(tmp_path / "src"), num_classes=2, per_class=6, size=16, fmt="png")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        info = pack_image_folder(str(tmp_path / "src"), str(tmp_path / "packed"), shard_bytes=2_000,
                                 scheduler=cluster.scheduler_address, progress=False)
        with encode_client({**WHERE, "device": "cpu", "scheduler": cluster.scheduler_address}) as client:
            assert client.submit(lambda: 41 + 1).result() == 42
    inline = pack_image_folder(str(tmp_path / "src"), str(tmp_path / "inline"), shard_bytes=2_000, progress=False)
    assert info.fingerprint == inline.fingerprint and len(info.shards) > 1
