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
