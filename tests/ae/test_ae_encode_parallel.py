"""The encode at node scale, tested on CPU: worker <-> device pinning, one AE load per worker, store contents
independent of the worker count, bf16 autocast within tolerance of fp32 (recorded in the store), and the c' list
a store records for an AE trained without structure."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

from dcae15.ae.model import StructuredAutoencoder
from dcae15.ae.encode import (encode_images, encode_units, encoder_loads, load_encoder, local_device_indices,
                           prepare_store, store_channel_choices)
from storage.cluster import device_worker_envs
from storage.latent_store import LatentStore


def _arrays(url):
    store = LatentStore.open(url, read_only=True)
    return {name: store.group[name][:] for name in ("latents", "latents_flip", "labels", "valid")}


def test_worker_device_assignment():
    envs = device_worker_envs(["3", "5", "GPU-9a1b"], extra={"OMP_NUM_THREADS": "1"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5", "GPU-9a1b"] and envs[0]["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match="twice"):
        device_worker_envs(["0", "0"])
    with pytest.raises(ValueError, match="non-empty"):
        device_worker_envs([])
    # a running cluster whose workers each see all GPUs of their host: the i-th worker of a host gets GPU i
    hosts = {"tcp://a:2": "a", "tcp://a:1": "a", "tcp://b:7": "b"}
    assert local_device_indices(hosts, {"a": 8, "b": 8}) == {"tcp://a:1": 0, "tcp://a:2": 1, "tcp://b:7": 0}
    with pytest.raises(ValueError, match="one worker per GPU"):
        local_device_indices(hosts, {"a": 1, "b": 8})


def test_encoder_loaded_once_per_process(shapes_dataset, tiny_ae_url, tmp_path):
    fp = StructuredAutoencoder.from_pretrained(tiny_ae_url).fingerprint()
    url = prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path), resolution=32, flip=True, chunk_size=4,
                        ae_fingerprint=fp)
    before = encoder_loads().get(tiny_ae_url, 0)
    for unit in range(4):  # four tasks in this process
        encode_units(tiny_ae_url, shapes_dataset, url, [unit], batch_size=3, ae_fingerprint=fp)
    assert encoder_loads().get(tiny_ae_url, 0) - before <= 1
    assert LatentStore.open(url).missing_units() == []
    encoder, got_fp = load_encoder(tiny_ae_url, torch.device("cpu"), ae_fingerprint=fp)
    ae = StructuredAutoencoder.from_pretrained(tiny_ae_url)
    assert got_fp == fp and encoder is not None
    n = sum(p.numel() for p in encoder.parameters())
    assert n == sum(p.numel() for p in ae.net.encoder.parameters()) < sum(p.numel() for p in ae.parameters())


@pytest.mark.slow
def test_pinned_workers_load_once_and_write_the_same_store(shapes_dataset, tiny_ae_url, tmp_path):
    from dask.distributed import wait

    from storage.cluster import dask_client

    fp = StructuredAutoencoder.from_pretrained(tiny_ae_url).fingerprint()
    inline = prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path / "inline"), resolution=32, chunk_size=2)
    encode_units(tiny_ae_url, shapes_dataset, inline, list(range(8)), batch_size=3, ae_fingerprint=fp)

    store = prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path / "dask"), resolution=32, chunk_size=2)
    # two worker processes started like one-per-GPU workers (each its own CUDA_VISIBLE_DEVICES; CPU compute here)
    with dask_client(worker_envs=device_worker_envs(["0", "1"])) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        futures = [client.submit(encode_units, tiny_ae_url, shapes_dataset, store, [u], batch_size=3,
                                 ae_fingerprint=fp, decode_threads=2, pure=False) for u in range(8)]
        wait(futures)
        assert [f.result() for f in futures] == [[u] for u in range(8)]
        loads = client.run(lambda: __import__("dcae15.ae.encode", fromlist=["x"]).encoder_loads().get(tiny_ae_url, 0))
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1  # 8 tasks, at most one load per worker
    a, b = _arrays(inline), _arrays(store)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # identical whatever the worker count


@pytest.mark.numerics  # bf16 kernels against fp32 ones, against a threshold
def test_bf16_autocast_on_cpu_is_close_to_fp32_and_recorded(shapes_dataset, tiny_ae_url, tmp_path):
    from storage.shards import open_dataset

    ae = StructuredAutoencoder.from_pretrained(tiny_ae_url)
    images, _, _ = open_dataset(shapes_dataset).read_range(0, 8, 32)
    z32 = encode_images(ae, images, torch.device("cpu"))
    z16 = encode_images(ae.net.encoder, images, torch.device("cpu"), dtype="bfloat16")
    err = np.abs(z16 - z32).max() / np.abs(z32).max()
    # bf16 autocast rounds each conv's inputs and weights to bf16 (u = 2**-8 = 3.9e-3, 2u per product, fp32 sums);
    # ~10 layers of such errors at random signs ~ sqrt(10) * 2u ~ 0.025 of max|z|: 0.05 is 2x that. Below: fp32 would
    # differ by rounding alone (<= ~1e-6), so 1e-4 tells bf16 ran. Seen 5.4e-3 under ATEN_CPU_CAPABILITY=default and
    # avx512: 9x under the ceiling, 54x over the floor.
    assert 1e-4 < err < 0.05, err

    url = prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path), resolution=32, flip=False, dtype="bfloat16")
    assert LatentStore.open(url).attrs["compute_dtype"] == "bfloat16"
    encode_units(tiny_ae_url, shapes_dataset, url, [0], batch_size=8)
    # the same 8 images in one batch through the same bf16 kernels: the store holds z16 rounded to its dtype,
    # bit for bit
    stored = LatentStore.open(url).read_range(0, 8)
    np.testing.assert_array_equal(stored, z16.astype(stored.dtype))
    assert prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path), resolution=32, flip=False) == url  # auto: as stored
    with pytest.raises(ValueError, match="computed in bfloat16"):
        prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path), resolution=32, flip=False, dtype="float32")
    with pytest.raises(ValueError, match="allowed"):
        prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path), resolution=32, dtype="fp8")
    fresh = prepare_store(tiny_ae_url, shapes_dataset, str(tmp_path / "cpu"), resolution=32, flip=False)
    assert LatentStore.open(fresh).attrs["compute_dtype"] == "float32"  # auto on CPU


def test_store_records_the_channel_choices_the_ae_was_trained_with(shapes_dataset, tmp_path):
    from dcae15.diffusion.adt import ADTConfig

    torch.manual_seed(0)
    ae = StructuredAutoencoder.from_preset("tiny-f8c32")
    preset = list(ae.channel_choices)
    assert len(preset) > 1
    runs = {}
    for name, train in (("plain", {"structured": False}), ("sls", {"structured": True}),
                        ("custom", {"structured": True, "channel_choices": [16, 32]})):
        run = tmp_path / name
        ae.save_pretrained(str(run / "model"))
        (run / "config.yaml").write_text(yaml.safe_dump({"config": {"preset": "tiny-f8c32", **train}}))
        runs[name] = str(run / "model")
    assert store_channel_choices(ae, runs["plain"]) == [32]
    assert store_channel_choices(ae, runs["sls"]) == preset
    assert store_channel_choices(ae, runs["custom"]) == [16, 32]
    standalone = str(tmp_path / "pretrained")
    ae.save_pretrained(standalone)
    assert store_channel_choices(ae, standalone) == preset  # no training record: the AE's own list
    flat = StructuredAutoencoder.from_preset("tiny-f8c32", channel_choices=())
    assert store_channel_choices(flat, standalone) == [32]  # an AE without a c' list has no channel structure

    url = prepare_store(runs["plain"], shapes_dataset, str(tmp_path / "root"), resolution=32, flip=False)
    recorded = LatentStore.open(url).attrs["channel_choices"]
    assert recorded == [32] and ADTConfig().resolve(32, recorded) == [32]  # ADT then never masks channels
