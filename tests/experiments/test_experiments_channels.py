"""experiments/channels.py (issue 21): the Fashion-MNIST loader, the refusal without the data, and the whole sweep
(two workers sharing a root, the report, a rerun that skips) on minimal budgets."""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # experiments/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, per_class: int = 5, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A tiny idx set in Fashion-MNIST's layout: class k is a bright square at a k-dependent place."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k: 10 + 2 * k, 4:24] = 230
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_fashion_mnist_idx_to_class_folders(tmp_path):
    from PIL import Image

    from experiments.fashion_mnist import load_fashion_mnist, read_idx, write_class_folders

    images, labels = _fake_fashion_mnist(tmp_path / "fm")
    got, lab = load_fashion_mnist(tmp_path / "fm")
    assert np.array_equal(got, images) and np.array_equal(lab, labels)
    info = write_class_folders(tmp_path / "tree", per_class=3, folder=tmp_path / "fm")
    assert info["per_class"]["0-tshirt"] == 3 and len(info["per_class"]) == 10
    first = int(np.flatnonzero(labels == 9)[0])
    png = np.asarray(Image.open(tmp_path / "tree" / "9-boot" / f"{first:05d}.png"))
    assert png.shape == (32, 32, 3) and (png[..., 0] == png[..., 2]).all()  # grey repeated to RGB
    assert np.array_equal(png[2:30, 2:30, 0], images[first]) and not png[:2].any()  # 2 px zero padding
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")


def test_missing_fashion_mnist_refuses_with_the_install_command(tmp_path):
    from experiments import channels

    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        channels.main(["--root", str(tmp_path / "root"), "--fashion-mnist", str(tmp_path / "absent")])
    assert not (tmp_path / "root").exists()


def test_paper_channel_rule():
    from experiments.channels import paper_channel_choices

    assert paper_channel_choices(128) == tuple(range(16, 129, 4))  # the paper's 16, 20, ..., 128
    assert paper_channel_choices(64) == tuple(range(8, 65, 2))
    assert paper_channel_choices(8) == tuple(range(1, 9))


@pytest.mark.slow
def test_channel_sweep_two_workers_report_and_resume(tmp_path):
    from experiments import channels

    fm = tmp_path / "fm"
    _fake_fashion_mnist(fm)
    root, results = tmp_path / "root", tmp_path / "results"
    base = ["--root", str(root), "--sweep", "smoke", "--fashion-mnist", str(fm), "--workers", "2"]
    for w in ("1", "0"):  # worker 1 first: it must do its share and whatever of worker 0's it depends on
        channels.main(base + ["--worker", w])
    summary = channels.main(["--root", str(root), "--sweep", "smoke", "--report-only", "--results-dir", str(results)])

    stages = {p.stem for p in (root / "stages").glob("*.json")}
    sw = channels.SWEEPS["smoke"]
    for c in sw.channels:
        assert {f"ae-plain-c{c}-a0", f"encode-plain-c{c}-a0", f"dit-plain-c{c}-a0-noadt-s0",
                f"ae-structured-c{c}-a0"} <= stages
    assert {f"dit-{k}-c8-a0-{t}-s0" for k in ("plain", "structured") for t in ("adt", "noadt")} <= stages
    # the sweep's AEs differ only in c; the structured one uses the paper's c' rule
    cfg = {n: json.loads((root / "stages" / f"ae-{n}.json").read_text())["result"]["config"]
           for n in ("plain-c4-a0", "plain-c8-a0", "structured-c8-a0")}
    assert cfg["plain-c4-a0"]["preset"] == "sweep-f4c4" and cfg["plain-c8-a0"]["preset"] == "sweep-f4c8"
    assert cfg["structured-c8-a0"]["structured"] and not cfg["plain-c8-a0"]["structured"]
    assert not summary["missing"]
    assert set(summary["verdicts"]) >= {"fig1b_recon", "fig1b_generation", "table1", "table5_speed",
                                         "table5_alone", "table5_speed_acc"}
    text = (results / "RESULTS-channels-smoke.md").read_text()
    assert {"ae-plain-c8-a0-5st", "recon-structured-c8-a0-5st"} <= stages  # the Table 1 budget probe
    for title in ("Figure 1b at toy scale", "Figure 2 at toy scale", "Table 5 at c = 8", "Table 6 analogue",
                  "Table 1 at c = 8: the AE budget",
                  "No GPU was lent", "## Cost"):
        assert title in text
    for fig in ("fig1b", "fig1b_curves", "fig2_latent", "fig2_recon", "table5", "samples_per_c", "table1_budget"):
        assert (results / "figures" / f"channels_smoke_{fig}.png").stat().st_size > 1000

    # a rerun skips every finished run
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")}
    channels.main(base + ["--worker", "0"])
    assert {p.name: p.stat().st_mtime_ns for p in (root / "stages").glob("*.json")} == mtimes
