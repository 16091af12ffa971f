"""Shared helpers: fingerprints, offline weight lookup, the generated shapes dataset."""

import dataclasses

import numpy as np
import pytest

from dcae15.weights import MissingWeightsError, find_weights
from storage.fingerprint import fingerprint, short_id
from storage.synthetic import SHAPES, make_shapes_dataset, render_shape_image


@dataclasses.dataclass
class _Cfg:
    a: int = 1
    b: tuple = (1, 2)


def test_fingerprint_is_canonical_and_sensitive():
    assert fingerprint({"x": 1, "y": [1, 2]}) == fingerprint({"y": (1, 2), "x": 1})
    assert fingerprint(_Cfg()) == fingerprint({"a": 1, "b": [1, 2]})
    assert fingerprint(_Cfg(a=2)) != fingerprint(_Cfg())
    assert short_id("a", 1) != short_id("a", 2) and len(short_id("a")) == 12


def test_find_weights_search_order_and_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DCAE15_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(MissingWeightsError) as err:
        find_weights("vgg16-397923af.pth", what="LPIPS VGG16 backbone")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "w") in msg and "hub/checkpoints" in msg
    hub = tmp_path / "th" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "vgg16-397923af.pth").write_bytes(b"x")
    assert find_weights("vgg16-397923af.pth") == hub / "vgg16-397923af.pth"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "vgg16-397923af.pth").write_bytes(b"y")
    assert find_weights("vgg16-397923af.pth") == tmp_path / "w" / "vgg16-397923af.pth"  # $DCAE15_WEIGHTS first
    with pytest.raises(MissingWeightsError, match="given explicitly"):
        find_weights("vgg16-397923af.pth", explicit=tmp_path / "nope.pth")


def test_shapes_are_deterministic_and_distinct():
    a = render_shape_image(3, size=32, seed=7)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_shape_image(3, size=32, seed=7))
    assert not np.array_equal(a, render_shape_image(3, size=32, seed=8))
    assert not np.array_equal(a, render_shape_image(4, size=32, seed=7))
    with pytest.raises(ValueError, match="label must be"):
        render_shape_image(len(SHAPES))


def test_make_shapes_dataset_writes_class_tree(tmp_path):
    root = make_shapes_dataset(str(tmp_path / "shapes"), num_classes=3, per_class=2, size=16)
    dirs = sorted(p.name for p in (tmp_path / "shapes").iterdir())
    assert dirs == ["00_circle", "01_square", "02_triangle"]
    assert len(list((tmp_path / "shapes" / "01_square").glob("*.png"))) == 2
    assert root == str(tmp_path / "shapes")
    with pytest.raises(ValueError, match="fmt"):
        make_shapes_dataset(str(tmp_path / "x"), fmt="gif")
