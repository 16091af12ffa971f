"""storage.layout: one Root gives every artifact's address; it is the only place that spells the root's folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from storage.layout import Root
from storage.urls import write_atomic

REPO = Path(__file__).resolve().parents[2]


def test_addresses_under_any_root():
    for base in ("/r", "s3://bucket/r", "memory://r"):
        at = Root(base)
        assert at.dataset("shapes") == f"{base}/data/shapes"
        assert at.ae_run("a1") == f"{base}/runs/ae/a1" and at.ae_model("a1") == f"{base}/runs/ae/a1/model"
        assert at.latent_store("s1") == f"{base}/latents/s1"
        assert at.diffusion_run("DiT-tiny-x") == f"{base}/runs/diffusion/DiT-tiny-x"
        assert at.sample_store("q") == f"{base}/samples/q"
        assert at.results() == f"{base}/eval/results" and at.eval() == f"{base}/eval"
        assert at.figure("r_loss.png") == f"{base}/eval/figures/r_loss.png"
        assert at.ae_eval("fp") == f"{base}/eval/ae/fp" and at.raw_images("shapes") == f"{base}/raw/shapes"
        assert at.prefect_results() == f"{base}/prefect-results"
        assert at.rerun_record("k") == f"{base}/.dcae15/reruns/k.json"
    for bad in ("", "a/b", "..", "."):
        with pytest.raises(ValueError, match="one non-empty path component"):
            Root("/r").latent_store(bad)


def test_listings_find_what_the_addresses_name(tmp_path):
    for base in (str(tmp_path / "root"), "memory://layout-test/root"):
        at = Root(base)
        for url in (at.dataset("d") + "/meta.json", at.ae_model("a") + "/config.json",
                    at.latent_store("s") + "/zarr.json", at.diffusion_run("r") + "/config.yaml",
                    at.sample_store("q") + "/zarr.json", at.ae_eval("fp") + "/proxy_check.json",
                    at.figure("r_loss.png"), at.eval() + "/results-proxy.png", at.ae_eval("fp") + "/grid.png"):
            write_atomic(url, b"{}")
        assert at.datasets() == [at.dataset("d")] and at.ae_models() == [at.ae_model("a")]
        assert at.latent_stores() == [at.latent_store("s")] and at.diffusion_runs() == [at.diffusion_run("r")]
        assert at.sample_stores() == [at.sample_store("q")]
        assert at.ae_evals("proxy_check.json") == [at.ae_eval("fp") + "/proxy_check.json"]
        assert at.figures() == sorted([at.figure("r_loss.png"), at.eval() + "/results-proxy.png",
                                       at.ae_eval("fp") + "/grid.png"])


def test_no_other_code_spells_the_root_folders():
    """flows/, dcae15/ and storage/ address the root's folders only through storage.layout (docstrings aside)."""
    pattern = re.compile(r"""join\([^)]*["'](data|latents|samples|eval|runs)["']|["']runs/(ae|diffusion)"""
                         r"""|}/(data|latents|samples|eval|runs)\b|\(["']eval["'], ["']runs["']\)"""
                         r"""|["'](raw|prefect-results|\.dcae15)["']""")
    offenders = []
    for pkg in ("flows", "dcae15", "storage"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.name == "layout.py" and pkg == "storage":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and "``" not in code:
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_other_code_parses_url_schemes():
    """Whether a URL is local or remote is decided by storage.urls alone (``local://`` means one thing)."""
    pattern = re.compile(r"""["']://["']|startswith\(["'](file|s3|memory|local)|removeprefix\(["']file""")
    offenders = [f"{path.relative_to(REPO)}:{i}"
                 for pkg in ("flows", "dcae15", "storage") for path in sorted((REPO / pkg).rglob("*.py"))
                 if path.relative_to(REPO).as_posix() != "storage/urls.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line.split("#", 1)[0])]
    assert not offenders, offenders
