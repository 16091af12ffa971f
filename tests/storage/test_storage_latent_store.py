"""Latent/sample store round trips on memory, local and S3; mismatch errors; idempotence; concurrency; verify."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from storage.latent_store import IncompleteStoreError, LatentStore, StoreMismatchError, store_id
from storage.sample_store import SampleStore
from storage.units import StoreNotFoundError
from storage.urls import join, url_to_fs

ATTRS = {"ae_fingerprint": "ae-aaaa", "dataset_fingerprint": "ds-bbbb", "resolution": 64, "ae_name": "test"}


def unit_data(store, unit, seed=0):
    a, b = store.unit_bounds(unit)
    rng = np.random.default_rng([seed, unit])
    lat = rng.standard_normal((b - a, *store.latent_shape)).astype(np.float16) * 2 + 0.5
    valid = np.ones(b - a, bool)
    if unit == 1:
        valid[0] = False
    return lat, np.arange(a, b) % 10, valid, -lat


def fill(store, units=None, seed=0):
    for u in store.missing_units() if units is None else units:
        lat, lab, val, flip = unit_data(store, u, seed)
        store.write_unit(u, lat, lab, val, latents_flip=flip if store.has_flip else None)


def make(url, **kw):
    args = dict(num_samples=37, channels=4, height=2, width=3, flip=True, attrs=ATTRS, chunk_size=8)
    args.update(kw)
    return LatentStore.create(url, **args)


def test_store_id_is_deterministic_and_input_sensitive():
    a = store_id("ds1", "ae1", 256, "adm-center", True)
    assert a == store_id("ds1", "ae1", 256, "adm-center", True)
    assert len({a, store_id("ds2", "ae1", 256, "adm-center", True), store_id("ds1", "ae2", 256, "adm-center", True),
                store_id("ds1", "ae1", 512, "adm-center", True), store_id("ds1", "ae1", 256, "adm-center", False)}) == 5
    with pytest.raises(ValueError, match="resolution"):
        store_id("ds1", "ae1", 0)


def test_round_trip_all_backends(backend_url):
    url = join(backend_url, "latents", "s1")
    store = make(url)
    assert store.num_units == 5 and store.unit_bounds(4) == (32, 37)
    assert store.missing_units() == [0, 1, 2, 3, 4]
    with pytest.raises(IncompleteStoreError, match="5 of 5 units missing"):
        store.finalize()
    fill(store)
    assert store.missing_units() == [] and not store.is_complete
    stats = store.finalize()
    assert store.is_complete and store.verify()["ok"]

    reopened = LatentStore.open(url, expect_ae="ae-aaaa", expect_dataset="ds-bbbb", expect_resolution=64,
                                read_only=True)
    lat = reopened.read_range(0, 37)
    expect = np.concatenate([unit_data(store, u)[0] for u in range(5)])
    valid = reopened.valid()
    assert valid.sum() == 36 and not valid[8]
    expect[8] = 0  # invalid rows are stored as zeros
    np.testing.assert_array_equal(lat, expect)
    np.testing.assert_array_equal(reopened.read_range(0, 37, flip=True), -expect)
    np.testing.assert_array_equal(reopened.labels(), np.arange(37) % 10)
    # statistics over the valid rows, in float64
    x = expect[valid].astype(np.float64)
    np.testing.assert_allclose(stats["channel_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["channel_std"], x.std(axis=(0, 2, 3)), rtol=1e-6)
    rms = np.sqrt(np.mean(x**2))
    assert stats["scaling_factor_measured"] == pytest.approx(1 / rms)
    assert reopened.scaling_factor == pytest.approx(1 / rms)
    attrs = reopened.attrs
    assert attrs["ae_fingerprint"] == "ae-aaaa" and attrs["latent_channels"] == 4 and "channel_rms" in attrs


def test_ae_scaling_factor_is_kept_beside_the_measured_one(tmp_path):
    store = make(str(tmp_path / "s"), attrs={**ATTRS, "ae_scaling_factor": 0.41}, flip=False)
    fill(store)
    stats = store.finalize()
    assert store.scaling_factor == pytest.approx(0.41) and stats["scaling_factor"] == pytest.approx(0.41)
    assert stats["scaling_factor_measured"] != pytest.approx(0.41)


def test_mismatch_errors_name_both_fingerprints(tmp_path):
    url = str(tmp_path / "s")
    make(url)
    with pytest.raises(StoreMismatchError, match="'ae-aaaa'.*'ae-zzzz'"):
        LatentStore.open(url, expect_ae="ae-zzzz")
    with pytest.raises(StoreMismatchError, match="'ds-bbbb'.*'ds-yyyy'"):
        LatentStore.open(url, expect_dataset="ds-yyyy")
    with pytest.raises(StoreMismatchError, match="resolution"):
        LatentStore.open(url, expect_resolution=128)
    with pytest.raises(StoreMismatchError, match="ae_fingerprint: existing 'ae-aaaa' != requested 'ae-other'"):
        make(url, attrs={**ATTRS, "ae_fingerprint": "ae-other"})
    with pytest.raises(StoreMismatchError, match="num_samples"):
        make(url, num_samples=40)
    assert make(url).num_samples == 37  # same inputs: create is idempotent
    with pytest.raises(StoreNotFoundError, match="create"):
        LatentStore.open(str(tmp_path / "nothing"))


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        make(str(tmp_path / "a"), attrs={"ae_fingerprint": "x"})
    with pytest.raises(ValueError, match="codec must be one of"):
        make(str(tmp_path / "b"), codec="lzma9")
    store = make(str(tmp_path / "c"))
    lat, lab, val, flip = unit_data(store, 0)
    with pytest.raises(ValueError, match="latents must have shape"):
        store.write_unit(0, lat[:3], lab, val, flip)
    with pytest.raises(ValueError, match="latents_flip was not given"):
        store.write_unit(0, lat, lab, val)
    with pytest.raises(ValueError, match="NaN"):
        store.write_unit(0, np.full_like(lat, np.nan), lab, val, flip)
    with pytest.raises(ValueError, match="unit must be in"):
        store.unit_bounds(5)
    assert store.missing_units() == [0, 1, 2, 3, 4]


def test_rewrite_is_idempotent_and_unfinalizes(tmp_path):
    store = make(str(tmp_path / "s"))
    fill(store)
    first = store.finalize()
    before = store.read_range(0, 37).copy()
    fill(store, units=[2])  # same bytes again
    assert not store.is_complete  # any unit write invalidates the old statistics
    assert store.finalize() == first
    np.testing.assert_array_equal(store.read_range(0, 37), before)


def test_verify_detects_corruption(tmp_path):
    store = make(str(tmp_path / "s"), flip=False)
    fill(store)
    # Overwrite unit 3's rows behind the store's back (as a buggy concurrent writer would).
    store.group["latents"][24:32] = np.zeros((8, 4, 2, 3), np.float16)
    report = store.verify()
    assert not report["ok"] and report["corrupt"] == [3] and report["missing"] == []


@pytest.mark.concurrency
def test_units_written_concurrently_by_two_threads_are_intact(backend_url):
    store = make(join(backend_url, "c"), num_samples=64, chunk_size=16, inner_chunks=4)
    errors = []

    def work(units):
        try:
            fill(store, units=units)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in ([0, 2], [1, 3])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.verify() == {"ok": True, "missing": [], "corrupt": [], "checked": 4}


def test_markers_are_separate_objects_written_last(tmp_path):
    store = make(str(tmp_path / "s"))
    fill(store, units=[0])
    fs, root = url_to_fs(store.url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_dcae15/units", detail=False))
    assert names == ["00000000.json"]
    assert store.unit_marker(0)["sha256"].keys() == {"latents", "latents_flip", "labels", "valid"}


def test_sample_store_round_trip(backend_url):
    url = join(backend_url, "samples", "x")
    store = SampleStore.create(url, num_samples=10, height=4, width=5, attrs={"seed": 1}, chunk_size=4)
    assert store.missing_units() == [0, 1, 2]
    with pytest.raises(IncompleteStoreError):
        store.read_all()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    for u in store.missing_units():
        a, b = store.unit_bounds(u)
        store.write_unit(u, images[a:b], np.arange(a, b))
    got, labels = SampleStore.open(url).read_all()
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(labels, np.arange(10))
    with pytest.raises(ValueError, match="uint8"):
        store.write_unit(0, images[:4].astype(np.float32), np.arange(4))
    with pytest.raises(StoreMismatchError, match="latent-store"):
        LatentStore.open(url)
