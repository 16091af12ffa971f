"""Reference statistics: computed once per (dataset, resolution, extractor), reused, resumable, refused for another
extractor, and equal to a direct computation."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch


@pytest.mark.numerics  # features and float64 statistics by two paths, FID within a derived tolerance
def test_metrics_reference_matches_direct_stats_and_is_reused(proxy_spec, shapes_url, shapes_images, tmp_path,
                                                              monkeypatch):
    import dcae15.metrics.reference as reference
    from dcae15.metrics.fidelity import extract_features, feature_stats, generation_metrics

    cache = str(tmp_path / "eval")
    # blocks of 512 = 8 loader batches of 64: the same batches as the direct extraction's, so both run the same kernels
    # on the same inputs and the features are the same bits on any CPU (partial batches inside a block: the resume test)
    url = reference.reference_stats(shapes_url, 32, proxy_spec, cache_url=cache, num_features=300, block_size=512)
    ref = reference.load_reference(url)
    direct = extract_features(shapes_images[0], proxy_spec, device="cpu")["fid"]
    mu, sigma = feature_stats(direct)
    assert ref.features.shape == (300, direct.shape[1])
    np.testing.assert_array_equal(ref.features, direct.numpy()[ref.indices])
    # The statistics then differ by float64 arithmetic alone: sums of N = 1600 terms by blocks then outer products
    # minus n mu mu^T, against numpy's mean and two-pass covariance, each within N u64 max|f| (mu) and N u64 max|f|^2
    # (sigma) of the truth: twice that apart at most, 1.5e-12 and 6.6e-12 with max|f| = 4.3 (seen: mu equal, sigma
    # within 2.4e-15).
    two_n_u64 = 2 * len(direct) * np.finfo(np.float64).eps / 2
    np.testing.assert_allclose(ref.mu, mu, rtol=0, atol=two_n_u64 * float(direct.abs().max()))
    np.testing.assert_allclose(ref.sigma, sigma, rtol=0, atol=two_n_u64 * float(direct.abs().max()) ** 2)
    assert len(np.unique(ref.indices)) == 300
    assert ref.attrs["num_samples"] == 1600 and ref.attrs["resolution"] == 32
    assert ref.attrs["extractor_label"] == proxy_spec.label and ref.attrs["dataset_fingerprint"]
    # FID against the cached reference equals FID against the images themselves
    x = shapes_images[0][::3]
    a = generation_metrics(x, ref, extractor=proxy_spec, metrics=("fid",), device="cpu")["proxy-fid"]
    b = generation_metrics(x, shapes_images[0], extractor=proxy_spec, metrics=("fid",), device="cpu")["proxy-fid"]
    # FID (0.033) = tr s1 + tr s2 - 2 tr sqrt(s1 s2), eigenvalues of s1 s2 in [9e-8, 130]: eigvals' backward error
    # ~ D u64 ||s1 s2|| ~ 1e-12 moves each sqrt(lambda) by <= 1e-12 / (2 sqrt(9e-8)) ~ 2e-9, x D = 64 ~ 1e-7, 3e-6 of
    # the FID; sigma's difference allowed above moves it <= 4e-11 (measured by perturbing). Seen <= 1.9e-10 relative.
    assert a == pytest.approx(b, rel=1e-5, abs=1e-8)

    # reused: a second call computes nothing
    monkeypatch.setattr(reference, "_block_features", lambda *a, **k: pytest.fail("recomputed a cached reference"))
    assert reference.reference_stats(shapes_url, 32, proxy_spec, cache_url=cache, num_features=300) == url
    assert reference.get_reference(shapes_url, 32, proxy_spec, cache_url=cache, num_features=300).url == url
    # any changed input is another reference
    other = reference.reference_url(shapes_url, proxy_spec, reference.ReferenceConfig(resolution=24, num_features=300),
                                    cache_url=cache)
    assert other != url


def test_metrics_reference_resumes_after_a_kill(proxy_spec, shapes_url, tmp_path, monkeypatch):
    import dcae15.metrics.reference as reference

    real = reference._block_features
    calls = []

    def dies_on_third_block(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(reference, "_block_features", dies_on_third_block)
    kw = dict(cache_url=str(tmp_path / "eval"), num_features=100, block_size=400, seed=3)
    with pytest.raises(KeyboardInterrupt):
        reference.reference_stats(shapes_url, 32, proxy_spec, **kw)
    calls.clear()
    monkeypatch.setattr(reference, "_block_features", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    url = reference.reference_stats(shapes_url, 32, proxy_spec, **kw)
    assert len(calls) == 2  # blocks 3 and 4 of 4; blocks 1-2 came from their part files
    resumed = reference.load_reference(url)
    fresh = reference.load_reference(reference.reference_stats(shapes_url, 32, proxy_spec,
                                                               **{**kw, "cache_url": str(tmp_path / "fresh")}))
    # the same batches through the same kernels, the parts' float64 sums saved losslessly and added in the same order
    np.testing.assert_array_equal(resumed.mu, fresh.mu)
    np.testing.assert_array_equal(resumed.sigma, fresh.sigma)
    np.testing.assert_array_equal(resumed.features, fresh.features)


@pytest.mark.slow
def test_metrics_reference_decodes_in_worker_processes(proxy_spec, shapes_url, tmp_path):
    """2 spawned decode workers give the statistics of in-process decoding; loader batches never straddle a read
    block of a packed dataset (each block decoded once)."""
    import dcae15.metrics.reference as reference

    kw = dict(num_features=50, block_size=800, max_samples=400, seed=1)
    a = reference.load_reference(reference.reference_stats(shapes_url, 32, proxy_spec, cache_url=str(tmp_path / "a"),
                                                           num_workers=0, **kw))
    b = reference.load_reference(reference.reference_stats(shapes_url, 32, proxy_spec, cache_url=str(tmp_path / "b"),
                                                           num_workers=2, **kw))
    # workers only decode: the same batches of the same pixels go through the same network in this process, so the
    # statistics are the same bits
    np.testing.assert_array_equal(a.mu, b.mu)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.indices, b.indices)

    class Packed(torch.utils.data.Dataset):  # the attributes PackedImages exposes: read block, dataset rows
        block, rows = 4, np.array([0, 1, 3, 4, 5, 9, 12, 13])

    groups = reference._load_batches(Packed(), np.arange(8), batch_size=64)
    assert groups == [[0, 1, 2], [3, 4], [5], [6, 7]]  # rows {0,1,3}, {4,5}, {9}, {12,13}
    assert reference._load_batches(Packed.__new__(torch.utils.data.Dataset), np.arange(5), 2) == [[0, 1], [2, 3], [4]]
    assert reference.default_workers(100) == 0


def test_metrics_reference_refuses_another_extractor(proxy_spec, shapes_url, shapes_images, tmp_path):
    from dcae15.metrics.fidelity import generation_metrics
    from dcae15.metrics.reference import ReferenceMismatchError, get_reference

    ref = get_reference(shapes_url, 32, proxy_spec, cache_url=str(tmp_path / "eval"), num_features=50)
    other = dataclasses.replace(proxy_spec, fingerprint="0123456789abcdef")
    with pytest.raises(ReferenceMismatchError, match="0123456789abcdef"):
        generation_metrics(shapes_images[0][:20], ref, extractor=other, metrics=("fid",))


def test_metrics_reference_config_validation():
    from dcae15.metrics.reference import ReferenceConfig

    with pytest.raises(ValueError, match="resolution"):
        ReferenceConfig(resolution=4)
    with pytest.raises(ValueError, match="max_samples"):
        ReferenceConfig(resolution=32, max_samples=1)


@pytest.mark.concurrency
def test_metrics_two_evaluations_at_once_compute_the_reference_and_proxy_once(shapes_url, tmp_path, monkeypatch,
                                                                              capsys):
    """Two evaluations of one dataset at once (two threads: each its own claimant) while the test holds the
    cache entry: both wait, then one trains the proxy / computes the statistics and the other reads them (issue 24:
    without the claim the first one's cleanup removed the parts the second was summing)."""
    import threading

    import dcae15.metrics.proxy as proxy
    import dcae15.metrics.reference as reference
    from storage.lease import claim

    monkeypatch.setenv("DCAE15_LEASE_SECONDS", "3")
    calls = {"proxy": 0, "reference": 0}

    def spy(name, real):
        def counted(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return counted

    monkeypatch.setattr(proxy, "_train_and_cache", spy("proxy", proxy._train_and_cache))
    monkeypatch.setattr(reference, "_compute_reference", spy("reference", reference._compute_reference))
    cache, cfg = str(tmp_path / "eval"), proxy.ProxyConfig(epochs=1, width=4)
    # where each artifact lives: a first (discarded) cache tells us the URLs the shared one will use
    probe = proxy.proxy_extractor(shapes_url, cfg, cache_url=str(tmp_path / "probe"))
    proxy_url = probe.weights_path.replace(str(tmp_path / "probe"), cache).rsplit("/", 1)[0]
    ref_url = reference.reference_url(shapes_url, probe, reference.ReferenceConfig(resolution=32, num_features=100),
                                      cache_url=cache)
    calls.update(proxy=0, reference=0)
    out: list = []

    def evaluation():
        spec = proxy.proxy_extractor(shapes_url, cfg, cache_url=cache)
        out.append((spec.fingerprint, reference.reference_stats(shapes_url, 32, spec, cache_url=cache,
                                                                num_features=100, block_size=400)))

    threads, seen = [threading.Thread(target=evaluation) for _ in range(2)], []

    def wait_until_waiting(count: int) -> None:
        deadline = time.monotonic() + 120
        while (seen.append(capsys.readouterr().out) or "".join(seen).count("waiting: ")) < count:
            assert time.monotonic() < deadline, f"the evaluations did not wait: {''.join(seen)}"
            time.sleep(0.1)

    with claim(proxy_url, what="held by the test"):  # both evaluations meet at the proxy cache entry ...
        for t in threads:
            t.start()
        wait_until_waiting(2)
        ref_hold = claim(ref_url, what="held by the test")
        ref_hold.__enter__()
    try:
        wait_until_waiting(4)  # ... then (one trained it, the other loaded it) at the reference statistics
    finally:
        ref_hold.__exit__(None, None, None)
    for t in threads:
        t.join(timeout=240)
    assert calls == {"proxy": 1, "reference": 1}
    assert len(out) == 2 and out[0] == out[1] and out[0][0] == probe.fingerprint
    assert reference.load_reference(out[0][1]).attrs["num_samples"] == 1600
