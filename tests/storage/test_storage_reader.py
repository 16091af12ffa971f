"""LatentStreamDataset: exactly-once epochs over ranks × workers, equal batch counts, exact resume, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from storage.latent_store import IncompleteStoreError, LatentStore
from storage.reader import LatentStreamDataset

N = 203


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    """Row i holds latent [i, i % 7] (flip: negated), so every yielded value can be checked; ~10% invalid."""
    url = str(tmp_path_factory.mktemp("reader") / "lat")
    attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 8}
    store = LatentStore.create(url, num_samples=N, channels=2, height=1, width=1, flip=True, attrs=attrs,
                               chunk_size=16)
    valid = np.random.default_rng(0).random(N) > 0.1
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        rows = np.arange(a, b)
        lat = np.stack([rows, rows % 7], 1).reshape(-1, 2, 1, 1).astype(np.float16)
        store.write_unit(u, lat, rows % 5, valid[a:b], -lat)
    store.finalize()
    return url


def valid_rows(url):
    return set(np.flatnonzero(LatentStore.open(url, read_only=True).valid()).tolist())


def run_rank(url, rank, world_size, workers, batch_size, state=None, limit=None, seed_override=3, **kw):
    kw = {"normalize": "none", "shuffle_chunks": 2, "infinite": False, **kw}
    ds = LatentStreamDataset(url, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed_override,
                             **kw)
    if state is not None:
        ds.load_state_dict(state)
    out = []
    for batch in DataLoader(ds, batch_size=None, num_workers=workers):
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def check_values(batch):
    x = batch["latents"][:, 0, 0, 0].numpy()
    rows = batch["indices"].numpy()
    flipped = batch["flipped"].numpy()
    np.testing.assert_array_equal(np.where(flipped, -x, x), rows)
    np.testing.assert_array_equal(batch["labels"].numpy(), rows % 5)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,workers,batch_size", [(1, 0, 8), (2, 2, 5), (3, 1, 7), (1, 3, 6)])
def test_exactly_once_per_epoch_and_equal_batches(store_url, world_size, workers, batch_size):
    valid = valid_rows(store_url)
    streams = world_size * max(workers, 1)
    counts, seen = [], []
    for rank in range(world_size):
        batches = run_rank(store_url, rank, world_size, workers, batch_size)
        counts.append(len(batches))
        for b in batches:
            check_values(b)
            seen.extend(b["indices"].tolist())
        assert batches[-1]["state"]["epoch"] == 1 and batches[-1]["state"]["step"] == 0
    assert len(set(counts)) == 1, f"ranks yield different batch counts {counts}"
    assert len(seen) == len(set(seen)), "a row was yielded twice in one epoch"
    assert set(seen) <= valid
    assert len(valid) - len(seen) == len(valid) % streams  # only the documented remainder (< streams) is left out


def test_epochs_differ_and_are_reproducible(store_url):
    e0 = [b["indices"] for b in run_rank(store_url, 0, 1, 0, 8)]
    again = [b["indices"] for b in run_rank(store_url, 0, 1, 0, 8)]
    e1 = [b["indices"] for b in run_rank(store_url, 0, 1, 0, 8, state={"epoch": 1, "step": 0})]
    assert all(torch.equal(a, b) for a, b in zip(e0, again))
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    assert sorted(torch.cat(e0).tolist()) == sorted(torch.cat(e1).tolist())


@pytest.mark.slow
@pytest.mark.parametrize("world_size,workers,batch_size,infinite", [(1, 0, 8, False), (2, 2, 5, False),
                                                                    (2, 3, 4, True), (1, 2, 16, True)])
def test_exact_resume_mid_epoch(store_url, world_size, workers, batch_size, infinite):
    rank = world_size - 1
    total = 40 if infinite else None
    full = run_rank(store_url, rank, world_size, workers, batch_size, limit=total, infinite=infinite)
    for cut in (1, 4, len(full) // 2 + 1):
        rest = run_rank(store_url, rank, world_size, workers, batch_size, state=full[cut - 1]["state"],
                        limit=None if total is None else total - cut, infinite=infinite)
        assert len(rest) == len(full) - cut
        for a, b in zip(full[cut:], rest):
            assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["latents"], b["latents"])
            assert a["state"] == b["state"]


def test_infinite_mode_full_batches_and_exactly_once_per_epoch(store_url):
    valid = valid_rows(store_url)
    length = len(valid) // 2  # one rank, two workers -> two streams of `length` rows per epoch
    batches = run_rank(store_url, 0, 1, 2, 7, infinite=True, limit=2 * (2 * length // 7 + 2))
    assert all(len(b["indices"]) == 7 for b in batches)
    per_stream = {0: [], 1: []}
    for k, b in enumerate(batches):
        per_stream[k % 2].extend(b["indices"].tolist())
    first_epoch = per_stream[0][:length] + per_stream[1][:length]
    assert len(set(first_epoch)) == 2 * length and set(first_epoch) <= valid
    second = per_stream[0][length:2 * length]
    assert len(second) == length and len(set(second)) == length  # the next epoch starts mid-batch, still unique


def test_normalisation_and_flip_options(store_url):
    store = LatentStore.open(store_url, read_only=True)
    sf = store.scaling_factor
    scaled = run_rank(store_url, 0, 1, 0, 16, normalize="scaling_factor", flip=False)
    for b in scaled:
        assert not b["flipped"].any()
        np.testing.assert_allclose(b["latents"][:, 0, 0, 0].numpy(), b["indices"].numpy() * sf, rtol=1e-6)
    flips = torch.cat([b["flipped"] for b in run_rank(store_url, 0, 1, 0, 16)])
    assert 0.3 < flips.float().mean() < 0.7
    x = torch.cat([b["latents"] for b in run_rank(store_url, 0, 1, 0, 16, normalize="channel_stats", flip=False)])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=0.05)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(2), atol=0.05)


def test_resume_refuses_other_settings(store_url):
    state = run_rank(store_url, 0, 1, 2, 5)[3]["state"]
    ds = LatentStreamDataset(store_url, batch_size=6, seed=3, normalize="none", shuffle_chunks=2, infinite=False)
    with pytest.raises(ValueError, match="batch_size"):
        ds.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers=2"):
        run_rank(store_url, 0, 1, 0, 5, state=state)
    with pytest.raises(ValueError, match="normalize must be one of"):
        LatentStreamDataset(store_url, batch_size=4, normalize="zscore")
    with pytest.raises(ValueError, match="rank"):
        LatentStreamDataset(store_url, batch_size=4, rank=2, world_size=2)


def test_incomplete_store_is_refused(tmp_path):
    attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 8}
    url = str(tmp_path / "s")
    LatentStore.create(url, num_samples=10, channels=1, height=1, width=1, flip=False, attrs=attrs, chunk_size=4)
    with pytest.raises(IncompleteStoreError, match="not complete"):
        next(iter(LatentStreamDataset(url, batch_size=2)))


def _write_like(url, flip=True, zero_unit=None):
    attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 8}
    store = LatentStore.create(url, num_samples=70, channels=2, height=1, width=1, flip=flip, attrs=attrs,
                               chunk_size=16)
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        rows = np.arange(a, b)
        lat = np.stack([rows, rows % 7], 1).reshape(-1, 2, 1, 1).astype(np.float16)
        valid = np.ones(b - a, bool) if u != zero_unit else np.zeros(b - a, bool)  # all-zero unit: no chunk object
        store.write_unit(u, lat, rows % 5, valid, -lat if flip else None)
    store.finalize()
    return store


def test_same_batches_on_every_backend_and_only_used_variants_read(backend_url, tmp_path):
    """Plain units are read directly (memmap / ranged reads); every backend yields the local store's batches, each
    (unit, variant) is read at most once per epoch, and with flips off latents_flip is never read."""
    url = backend_url + "/lat"
    _write_like(url, zero_unit=2)
    ref_url = str(tmp_path / "ref")
    _write_like(ref_url, zero_unit=2)
    for flip in (True, False):
        ds = LatentStreamDataset(url, batch_size=9, seed=1, normalize="none", shuffle_chunks=2, infinite=False,
                                 flip=flip, reads_in_flight=3)
        got = list(ds)
        want = run_rank(ref_url, 0, 1, 0, 9, flip=flip, seed_override=1)
        assert [b["indices"].tolist() for b in got] == [b["indices"].tolist() for b in want]
        for a, b in zip(got, want):
            assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["flipped"], b["flipped"])
            check_values(a)
        reads = ds.source().requests
        assert reads["row_index"] == 1
        assert reads["unit_reads"] <= (2 if flip else 1) * 4  # 3 units with rows (unit 2 is all invalid)


def test_labels_and_valid_read_once_per_rank_not_per_worker(store_url, monkeypatch):
    ds = LatentStreamDataset(store_url, batch_size=8, seed=3, normalize="none", infinite=False)

    def boom(self):
        raise AssertionError("labels/valid read again in a worker")

    monkeypatch.setattr(LatentStore, "labels", boom)
    monkeypatch.setattr(LatentStore, "valid", boom)
    monkeypatch.setattr(LatentStore, "read_row_index", boom)
    n = sum(len(b["indices"]) for b in DataLoader(ds, batch_size=None, num_workers=2))
    assert n > 0


def test_stores_without_row_index_and_float16_output(store_url, tmp_path):
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(store_url, old)
    (tmp_path / "old" / "_dcae15" / "rows.npz").unlink()  # finalized before the row index existed
    a = run_rank(store_url, 0, 1, 0, 8, normalize="scaling_factor")
    b = run_rank(old, 0, 1, 0, 8, normalize="scaling_factor", dtype="float16")
    assert all(x["latents"].dtype == torch.float16 and x["latents"].is_contiguous() for x in b)
    assert [x["indices"].tolist() for x in a] == [x["indices"].tolist() for x in b]
    # the same stored fp16 values times the same scale, rounded once more to float16: <= u16 = 2**-11 = 4.9e-4 relative
    # (rtol 1e-3 = 2 u16); below float16's normal range (6.1e-5) its spacing is 6e-8, hence atol 1e-7
    for x, y in zip(a, b):
        torch.testing.assert_close(y["latents"].float(), x["latents"], rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="dtype"):
        LatentStreamDataset(store_url, batch_size=4, dtype="bfloat8")
    with pytest.raises(ValueError, match="reads_in_flight"):
        LatentStreamDataset(store_url, batch_size=4, reads_in_flight=0)


def test_compressed_store_is_read_through_zarr(tmp_path):
    attrs = {"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 8}
    url = str(tmp_path / "z")
    store = LatentStore.create(url, num_samples=40, channels=2, height=1, width=1, flip=True, attrs=attrs,
                               chunk_size=16, codec="zstd1")
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        rows = np.arange(a, b)
        lat = np.stack([rows, rows % 7], 1).reshape(-1, 2, 1, 1).astype(np.float16)
        store.write_unit(u, lat, rows % 5, np.ones(b - a, bool), -lat)
    store.finalize()
    assert store.raw_unit_object(0) is None
    batches = run_rank(url, 0, 1, 0, 6)
    for b in batches:
        check_values(b)
    assert sorted(torch.cat([b["indices"] for b in batches]).tolist()) == list(range(40))
