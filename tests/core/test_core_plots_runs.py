"""Run figures: the sample grid (a row per class), the loss curve, and the results plot's extractor facts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def test_sample_grid_and_loss_curve_are_pngs():
    from dcae15.diffusion.plots import loss_curve_png, sample_grid_png

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    png = sample_grid_png(images, np.arange(20) % 4, ["circle", "square", "ring", "star"], per_class=5)
    assert Image.open(io.BytesIO(png)).size[0] > 5 * 16
    png = loss_curve_png([{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 50)], title="run")
    assert Image.open(io.BytesIO(png)).format == "PNG"
    with pytest.raises(ValueError):
        loss_curve_png([{"step": 1}])
    with pytest.raises(ValueError):
        sample_grid_png(images[..., 0], np.zeros(20), ["a"])


def test_grid_of_a_1000_class_store_is_bounded_and_read_unit_by_unit(tmp_path):
    """1000 classes at 256 px: the grid shows the default 16 spread classes (a bounded figure), picked from a
    sample store read one unit at a time; an explicit class list is honoured and checked."""
    from dcae15.diffusion.plots import GRID_CLASSES, collect_grid_images, grid_classes, sample_grid_png
    from storage.sample_store import SampleStore

    rows = grid_classes(1000)
    assert len(rows) == GRID_CLASSES and rows[0] == 0 and rows[-1] == 999
    assert grid_classes(8) == list(range(8)) and grid_classes(1000, [207, 360]) == [207, 360]
    for bad in ([1000], [3, 3], list(range(101)), []):
        with pytest.raises(ValueError, match="grid classes"):
            grid_classes(1000, bad)
    store = SampleStore.create(str(tmp_path / "s"), num_samples=64, height=256, width=256, attrs={}, chunk_size=16)
    labels = (np.arange(64) * 37) % 1000
    for u in range(store.num_units):
        a, b = store.unit_bounds(u)
        store.write_unit(u, np.full((b - a, 256, 256, 3), u * 60, np.uint8), labels[a:b])
    read = []
    wanted = [int(labels[3]), int(labels[20])]  # in units 0 and 1: units 2-3 are never read
    units = (read.append(u) or batch for u, batch in enumerate(store.iter_units()))
    images, got = collect_grid_images(units, wanted, per_class=1)
    assert read == [0, 1] and got.tolist() == wanted and images[1].max() == 60
    png = sample_grid_png(images, got, [f"n{i:08d}" for i in range(1000)], classes=wanted, per_class=4)
    assert Image.open(io.BytesIO(png)).size[1] < 2 * 258 + 100  # two rows at scale 1


def test_results_plot_draws_sample_metrics_only(tmp_path):
    """The proxy's own accuracy is a property of the extractor: written in the title, not drawn as a panel."""
    from dcae15.metrics.results import append_results, plot_results

    table = str(tmp_path / "results")
    for step, acc in ((100, 0.3), (200, 0.6)):
        append_results(table, [{"run_id": "SiT-tiny-x", "backbone": "SiT-tiny", "step": step,
                                "feature_extractor": "proxy-abc", "proxy-fid": 10.0 / step,
                                "proxy-class_accuracy": acc, "proxy-classifier_accuracy": 0.99}])
    (url,) = plot_results(table, str(tmp_path / "out"), references={"proxy-abc": {"proxy-fid": 0.01}})
    width = Image.open(url).size[0]
    assert width == 2 * 420  # two panels (class accuracy, FID); 4.2 in per panel at 100 dpi
