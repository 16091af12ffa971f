"""Generation metrics through torch-fidelity on the proxy network: FID ~0 on itself, > 0 when shifted, IS bounds."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.numerics  # proxy-trained features: thresholds must hold whatever kernels trained the proxy


def test_metrics_fid_self_zero_shifted_positive(proxy_spec, shapes_images, shift):
    from dcae15.metrics.fidelity import generation_metrics

    x = shapes_images[0][::2]  # 800 images, all classes
    same = generation_metrics(x, x, extractor=proxy_spec, metrics=("fid", "precision", "recall"), device="cpu")
    assert abs(same["proxy-fid"]) < 1e-6
    assert same["proxy-precision"] == 1.0 and same["proxy-recall"] == 1.0
    halves = generation_metrics(x[0::2], x[1::2], extractor=proxy_spec, metrics=("fid",), device="cpu")
    moved = generation_metrics(shift(x[0::2]), x[1::2], extractor=proxy_spec, metrics=("fid", "precision"),
                               device="cpu")
    # two halves of one distribution are close; a shifted set is far away and mostly off the real manifold
    assert moved["proxy-fid"] > 10 * max(halves["proxy-fid"], 1e-3)
    assert moved["proxy-precision"] < 0.5


def test_metrics_inception_score_bounds(proxy_spec, shapes_images):
    from dcae15.metrics.fidelity import generation_metrics

    x, labels, _ = shapes_images
    real = generation_metrics(x, x, extractor=proxy_spec, metrics=("is",), device="cpu")
    assert 1.0 <= real["proxy-is"] <= 8.0
    assert real["proxy-is_std"] >= 0
    # one class only: the marginal equals the conditionals, IS drops towards 1
    one = generation_metrics(x[labels == 0], x, extractor=proxy_spec, metrics=("is",), device="cpu")
    assert 1.0 <= one["proxy-is"] < real["proxy-is"]


def test_metrics_names_are_labelled_and_kid_works(proxy_spec, shapes_images):
    from dcae15.metrics.fidelity import generation_metrics

    x = shapes_images[0][:200]
    out = generation_metrics(x[:100], x[100:], extractor=proxy_spec, metrics=("fid", "is", "precision", "recall", "kid"),
                             device="cpu", isc_splits=2, kid_subsets=5)
    assert out and all(k.startswith("proxy-") for k in out)
    assert set(out) >= {"proxy-fid", "proxy-is", "proxy-precision", "proxy-recall", "proxy-kid",
                        "proxy-classifier_accuracy"}
    assert all(np.isfinite(v) for v in out.values())


def test_metrics_inputs_and_bad_arguments(proxy_spec, tmp_path):
    import torch

    from dcae15.metrics.fidelity import generation_metrics
    from dcae15.metrics.inputs import load_labelled_images
    from storage.synthetic import make_shapes_dataset

    small = make_shapes_dataset(str(tmp_path / "small"), num_classes=3, per_class=8, size=32, seed=5)
    x = load_labelled_images(small, resolution=None)[0]
    from_folder = generation_metrics(small, x, extractor=proxy_spec, metrics=("fid",), device="cpu")
    chw = torch.from_numpy(x).permute(0, 3, 1, 2)
    from_tensor = generation_metrics(chw, x, extractor=proxy_spec, metrics=("fid",), device="cpu")
    # 24 images in 64 dims: a singular covariance, so "zero" is round-off sized
    assert abs(from_folder["proxy-fid"]) < 1e-4 and abs(from_tensor["proxy-fid"]) < 1e-4
    with pytest.raises(ValueError, match="metrics must be"):
        generation_metrics(x, x, extractor=proxy_spec, metrics=("lpips",))
    with pytest.raises(ValueError, match="uint8"):
        generation_metrics(x.astype(np.float32), x, extractor=proxy_spec, metrics=("fid",))
    with pytest.raises(ValueError, match="unsupported image source"):
        generation_metrics([1, 2, 3], x, extractor=proxy_spec, metrics=("fid",))
