"""Image sources for the metrics: arrays, folders, packed datasets, sample stores — all uint8 [3,H,W]."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _check(ds, n, size):
    assert len(ds) == n
    item = ds[n - 1]
    assert item.dtype == torch.uint8 and tuple(item.shape) == (3, size, size)
    return item


def test_metrics_inputs_array_folder_packed_samplestore(shapes_url, shapes_images, tmp_path):
    from dcae15.metrics.inputs import as_image_dataset, dataset_fingerprint, default_cache_url, detect_kind
    from storage.sample_store import SampleStore
    from storage.shards import pack_image_folder

    x, labels, classes = shapes_images
    assert x.shape == (1600, 32, 32, 3) and len(classes) == 8 and np.bincount(labels).tolist() == [200] * 8
    a = _check(as_image_dataset(x), 1600, 32)
    np.testing.assert_array_equal(a.permute(1, 2, 0).numpy(), x[-1])
    folder = as_image_dataset(shapes_url, resolution=16)  # centre crop (ADM) to 16 px
    _check(folder, 1600, 16)
    assert detect_kind(shapes_url) == "folder" and default_cache_url(shapes_url).endswith("shapes.eval")

    packed = str(tmp_path / "data" / "shapes")
    pack_image_folder(shapes_url, packed, progress=False)
    assert detect_kind(packed) == "packed" and default_cache_url(packed) == packed + "/eval"
    p = as_image_dataset(packed, resolution=32)
    _check(p, 1600, 32)
    assert dataset_fingerprint(packed) != dataset_fingerprint(shapes_url)
    assert sorted(p[i].sum().item() for i in range(0, 1600, 97)) is not None

    store_url = str(tmp_path / "samples" / "s1")
    store = SampleStore.create(store_url, num_samples=100, height=32, width=32, attrs={"t": 1}, chunk_size=32)
    for u in range(store.num_units):
        lo, hi = store.unit_bounds(u)
        store.write_unit(u, x[lo:hi], labels[lo:hi])
    assert detect_kind(store_url) == "sample_store"
    s = as_image_dataset(store_url)
    for i in (0, 31, 32, 99):  # across unit boundaries
        np.testing.assert_array_equal(s[i].permute(1, 2, 0).numpy(), x[i])


def test_metrics_inputs_refuse_incomplete_store_and_bad_arrays(tmp_path):
    from dcae15.metrics.inputs import as_image_dataset
    from storage.sample_store import SampleStore

    url = str(tmp_path / "partial")
    store = SampleStore.create(url, num_samples=64, height=8, width=8, attrs={}, chunk_size=32)
    store.write_unit(0, np.zeros((32, 8, 8, 3), np.uint8), np.zeros(32, np.int64))
    with pytest.raises(ValueError, match="incomplete"):
        as_image_dataset(url)
    with pytest.raises(ValueError, match="3 channels"):
        as_image_dataset(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="neither"):
        as_image_dataset(str(tmp_path / "missing"))


def test_metrics_dataset_fingerprint_tracks_the_listing(tmp_path):
    from dcae15.metrics.inputs import dataset_fingerprint
    from storage.synthetic import make_shapes_dataset

    root = make_shapes_dataset(str(tmp_path / "d"), num_classes=2, per_class=3, size=16)
    fp = dataset_fingerprint(root)
    assert dataset_fingerprint(root) == fp
    make_shapes_dataset(root, num_classes=2, per_class=4, size=16)  # one more image per class
    assert dataset_fingerprint(root) != fp
