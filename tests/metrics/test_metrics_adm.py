"""ADM's npz layout: a sample store exported and read back exactly; an ADM reference batch loaded with its own
statistics equals the statistics computed from its images with the same extractor; clear errors for bad files."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest


def _store(tmp_path, images, labels, chunk=4):
    from storage.sample_store import SampleStore

    store = SampleStore.create(str(tmp_path / "samples"), num_samples=len(images), height=images.shape[1],
                               width=images.shape[2], attrs={"run_id": "r", "checkpoint_step": 3}, chunk_size=chunk)
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        store.write_unit(u, images[a:b], labels[a:b])
    return store


def _adm_stream(path, name="arr_0"):
    """Read ``name`` the way ADM's evaluator does: the zip member's .npy header, then raw batches."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf, zf.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        assert version in ((1, 0), (2, 0))
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member) if version == (1, 0) else \
            np.lib.format.read_array_header_2_0(member)
        assert not fortran
        return np.frombuffer(member.read(), dtype=dtype).reshape(shape)


def test_metrics_adm_export_npz_round_trip(tmp_path):
    from dcae15.metrics.adm import NpzImages, export_npz, is_adm_batch
    from dcae15.metrics.inputs import as_image_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 10)
    store = _store(tmp_path, images, labels)
    out = export_npz(store.url, str(tmp_path / "out" / "samples.npz"))
    assert out["num_samples"] == 10 and out["attrs"]["run_id"] == "r"
    with np.load(out["url"], allow_pickle=False) as z:  # what every peer's script reads
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_0"], images)
        assert z["arr_1"].dtype == np.int64 and np.array_equal(z["arr_1"], labels)
    assert np.array_equal(_adm_stream(out["url"]), images)  # ADM's streaming reader
    with zipfile.ZipFile(out["url"]) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert is_adm_batch(out["url"]) and not list(tmp_path.glob("out/.*partial"))
    ds = as_image_dataset(out["url"])
    assert isinstance(ds, NpzImages) and len(ds) == 10
    ds.block = 3  # blocks that do not divide N, read forward then backward
    got = np.stack([ds[i].permute(1, 2, 0).numpy() for i in [*range(10), 2]])
    assert np.array_equal(got[:10], images) and np.array_equal(got[10], images[2])


def test_metrics_adm_bad_inputs_are_named(tmp_path):
    from dcae15.metrics.adm import NpzImages, export_npz
    from storage.sample_store import SampleStore

    store = SampleStore.create(str(tmp_path / "s"), num_samples=8, height=4, width=4, attrs={}, chunk_size=4)
    store.write_unit(0, np.zeros((4, 4, 4, 3), np.uint8), np.zeros(4))
    with pytest.raises(ValueError, match="incomplete .*1 of 2 units"):
        export_npz(store.url, str(tmp_path / "x.npz"))
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        NpzImages(str(tmp_path / "nowhere.npz"))
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        NpzImages(str(tmp_path / "floats.npz"))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        NpzImages(str(tmp_path / "other.npz"))
    buf = io.BytesIO()  # a header promising 6 images, data for 2
    with zipfile.ZipFile(buf, "w") as zf, zf.open("arr_0.npy", "w") as m:
        np.lib.format.write_array_header_1_0(m, {"descr": "|u1", "fortran_order": False, "shape": (6, 4, 4, 3)})
        m.write(np.zeros((2, 4, 4, 3), np.uint8).tobytes())
    (tmp_path / "cut.npz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="truncated at image 2 of 6"):
        NpzImages(str(tmp_path / "cut.npz"))[5]


def test_metrics_adm_reference_equals_statistics_of_its_images(tmp_path, stand_in_inception, shapes_images,
                                                              no_download):
    """An ADM-format reference (images + mu/sigma/mu_s/sigma_s) loads to the statistics our own reference code
    computes from the same images with the same extractor; so does a batch that carries images only. Long (~45 s
    quiet): each protocol (adm, dc-gen) needs its own Inception passes at 299 px on CPU; four images are the
    fewest precision/recall (k = 3) accept."""
    from PIL import Image

    from dcae15.metrics.adm import adm_reference, write_adm_npz
    from dcae15.metrics.fidelity import generation_metrics, inception_extractor
    from dcae15.metrics.reference import ReferenceMismatchError, get_reference

    spec = inception_extractor(stand_in_inception)
    assert spec.has_sfid
    images = shapes_images[0][:4]  # CPU Inception at 299 px is slow; precision (k=3) needs 4 images
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    ours = get_reference(str(tmp_path / "train"), 32, spec, cache_url=str(tmp_path / "cache"))
    assert ours.mu.shape == (2048,) and ours.mu_s.shape == (2023,) and ours.sigma_s.shape == (2023, 2023)

    plain = write_adm_npz(str(tmp_path / "plain.npz"), [images[:3], images[3:]], 4)  # images only
    full = write_adm_npz(str(tmp_path / "VIRTUAL_ref.npz"), [images], 4, extra={
        "mu": ours.mu, "sigma": ours.sigma, "mu_s": ours.mu_s, "sigma_s": ours.sigma_s})
    ref_plain = adm_reference(plain, spec)
    ref_full = adm_reference(full, spec)
    for ref in (ref_plain, ref_full):
        assert ref.kind == "adm" and ref.describe().startswith("adm:")
        # P/R features, all 4: the same 4 images in one batch through the same kernels, so the same bits
        np.testing.assert_array_equal(ref.features, ours.features)
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(ref_full, k), getattr(ours, k))  # read back from the file
    # ref_plain's statistics come from the same features by numpy's mean and two-pass cov, ours by sums of N = 4 outer
    # products minus n mu mu^T: float64 arithmetic alone, each within N u64 F (mu), N u64 F^2 (sigma) of the truth,
    # F = the largest |feature| <= max|mu| + sqrt((N - 1) max sigma_ii). Scaled by F, not fixed: the stand-in's
    # features are tiny (|f| <= 2.5e-7, sigma <= 1.3e-15; seen: mu equal, sigma within 1.8e-30).
    two_n_u64 = 2 * 4 * np.finfo(np.float64).eps / 2
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        m, s = getattr(ours, mu), getattr(ours, sigma)
        big = np.abs(m).max() + np.sqrt(3 * np.diag(s).max())
        np.testing.assert_allclose(getattr(ref_plain, mu), m, rtol=0, atol=two_n_u64 * big)
        np.testing.assert_allclose(getattr(ref_plain, sigma), s, rtol=0, atol=two_n_u64 * big ** 2)
    assert ref_full.attrs["statistics_from"] == ["mu", "mu_s", "sigma", "sigma_s"] and ref_full.attrs["computed"] == []
    out = generation_metrics(plain, ref_full, extractor=spec, metrics=("fid", "sfid", "precision"), device="cpu")
    # the same images against their own statistics: zero up to round-off (stand-in weights give tiny features).
    # sigma has rank <= 3, so ~2045 eigenvalues of sigma @ sigma are 0 and come out ~ +-u64 ||sigma||^2; the square
    # roots of the positive ones add <= 2045 sqrt(u64) ||sigma|| ~ 2.1e-5 tr(sigma); 1e-4 is 5x that (seen <= 1.5e-6
    # tr(sigma))
    assert abs(out["fid"]) <= 1e-4 * np.trace(ours.sigma) and abs(out["sfid"]) <= 1e-4 * np.trace(ours.sigma_s)
    assert out["precision"] == 1.0
    # by protocol (issue 31): adm takes everything from the batch, dc-gen FID from the train split and
    # precision/recall from the batch; both with the sqrtm FID
    adm = generation_metrics(plain, ref_full, extractor=spec, metrics=("fid", "is", "precision", "recall"),
                             device="cpu", protocol="adm")
    assert abs(adm["fid"]) <= 1e-4 * np.trace(ours.sigma) and adm["precision"] == adm["recall"] == 1.0
    assert adm["is"] >= 1.0 - 1e-9
    # dc-gen: FID and precision/recall features through DC-Gen's input pipeline (references cached apart; the
    # batch's own TF statistics are not used with it), IS through torch-fidelity's own Inception
    dg = inception_extractor(stand_in_inception, input="pytorch-fid")
    ours_dg = get_reference(str(tmp_path / "train"), 32, dg, cache_url=str(tmp_path / "cache"))
    pr_dg = adm_reference(full, dg)
    assert pr_dg.attrs["statistics_from_file"] is False and pr_dg.url != ref_full.url
    with pytest.raises(ReferenceMismatchError):
        ours.check_extractor(dg)
    dcgen = generation_metrics(plain, ours_dg, extractor=dg, metrics=("fid", "is", "precision", "recall"),
                               device="cpu", protocol="dc-gen", pr_reference=pr_dg, isc_extractor=spec, isc_splits=2)
    assert abs(dcgen["fid"]) <= 1e-4 * np.trace(ours_dg.sigma) and dcgen["precision"] == dcgen["recall"] == 1.0
    std_is = generation_metrics(plain, ours, extractor=spec, metrics=("is",), device="cpu", protocol="dc-gen",
                                isc_splits=2)
    assert np.isfinite(dcgen["is"]) and dcgen["is"] == pytest.approx(std_is["is"], rel=1e-9)  # IS from the standard input either way
    with pytest.raises(ReferenceMismatchError, match="standard Inception"):
        ours.attrs = {**ref_full.attrs, "extractor_fingerprint": "other"}
        ours.check_extractor(spec)


def test_metrics_adm_cli_export_and_config(tmp_path, capsys):
    """``dcae15 export-npz`` writes the ADM batch without Prefect; ``evaluate.reference`` is checked at load."""
    import json

    from flows.cli import main
    from flows.config import load_config

    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.arange(5)
    store = _store(tmp_path, images, labels, chunk=2)
    assert main(["export-npz", "--samples", store.url, "--out", str(tmp_path / "s.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 5
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)
    cfg = load_config("tiny", {"evaluate": {"reference": "/refs/VIRTUAL_imagenet256_labeled.npz",
                                            "extractor": "inception"}})
    assert cfg.evaluate.reference.endswith(".npz")
    with pytest.raises(ValueError, match="evaluate.reference must be 'train' or an ADM reference batch"):
        load_config("tiny", {"evaluate": {"reference": "imagenet"}})
    with pytest.raises(ValueError, match="extractor: inception"):
        load_config("tiny", {"evaluate": {"reference": "/r.npz", "extractor": "proxy"}})
