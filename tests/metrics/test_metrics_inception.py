"""The standard Inception extractor offline: a clear error naming the file, and the real loading path with a
stand-in weights file (random values, right keys) — with every download route made to fail."""

from __future__ import annotations

import pickle

import numpy as np
import pytest


def test_metrics_missing_inception_weights_names_the_file(tmp_path, monkeypatch):
    from dcae15.metrics.fidelity import INCEPTION_WEIGHTS, inception_extractor
    from dcae15.weights import MissingWeightsError

    monkeypatch.setenv("DCAE15_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError) as err:
        inception_extractor()
    text = str(err.value)
    assert INCEPTION_WEIGHTS == "weights-inception-2015-12-05-6726825d.pth"
    assert INCEPTION_WEIGHTS in text and str(tmp_path / "empty") in text and "hub/checkpoints" in text
    assert "cannot download" in text
    with pytest.raises(MissingWeightsError, match="does not exist"):
        inception_extractor(tmp_path / "nowhere.pth")


def test_metrics_inception_offline_path_runs_without_download(stand_in_inception, monkeypatch, no_download,
                                                             shapes_images, shift):
    from dcae15.metrics.fidelity import generation_metrics, inception_extractor

    monkeypatch.setenv("DCAE15_WEIGHTS", str(stand_in_inception))
    spec = inception_extractor()
    assert spec.prefix == "" and spec.label == "inception-v3-compat" and spec.weights_path.startswith(
        str(stand_in_inception))
    x = shapes_images[0][:4]  # CPU Inception at 299 px is slow: the plumbing needs only a few images
    out = generation_metrics(shift(x, 120), x, extractor=spec, metrics=("fid", "is"), device="cpu", isc_splits=1)
    assert set(out) == {"fid", "is", "is_std"}  # Inception numbers carry no proxy- prefix
    assert np.isfinite(out["fid"]) and out["fid"] > 0
    assert 1.0 - 1e-9 <= out["is"] <= 1008  # random weights give near-uniform logits: IS ~ 1


def test_metrics_weights_are_loaded_without_unpickling_objects(tmp_path, monkeypatch, shapes_images):
    """torch-fidelity unpickles weights with weights_only=False; we load them safely first and refuse objects."""
    from dcae15.metrics.fidelity import INCEPTION_WEIGHTS, generation_metrics, inception_extractor

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    import torch

    torch.save({"x": Payload()}, tmp_path / INCEPTION_WEIGHTS)
    spec = inception_extractor(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        generation_metrics(shapes_images[0][:4], shapes_images[0][:4], extractor=spec, metrics=("fid",), device="cpu")
