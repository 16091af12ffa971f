"""The shapes generator's look options: texture, noise, size, background, position and rotation are what they say."""

from __future__ import annotations

import numpy as np
import pytest

from storage.synthetic import render_shape_image


def test_flat_background_flat_fill_centred():
    img = render_shape_image(0, size=32, seed=3, texture=0.0, noise=0.0, background="flat", jitter=0.0,
                             scale=(0.3, 0.3)).astype(int)
    corners = np.stack([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
    assert np.abs(corners - corners[0]).max() <= 1  # one colour, no gradient, no noise
    assert np.abs(img[14:18, 14:18] - img[16, 16]).max() <= 1  # a flat-filled circle at the centre
    assert np.abs(img[16, 16] - corners[0]).sum() > 30


def test_texture_and_noise_levels_add_detail():
    def detail(**kw):
        img = render_shape_image(1, size=32, seed=5, jitter=0.0, scale=(0.45, 0.45), **kw).astype(float)
        return np.abs(np.diff(img[10:22, 10:22], axis=1)).mean()  # inside the square

    assert detail(texture=0.0, noise=0.0) < 0.5 < detail(texture=1.0, noise=0.0)
    a = render_shape_image(2, size=32, seed=1, noise=0.0, background="flat").astype(float)
    b = render_shape_image(2, size=32, seed=1, noise=8.0, background="flat").astype(float)
    assert np.abs(a[0, :8] - a[0, 0]).max() <= 1 < np.abs(b[0, :8] - b[0, 0]).max()


@pytest.mark.parametrize("kw", [dict(texture=1.5), dict(noise=-1.0), dict(scale=(0.4, 0.3)), dict(scale=(0.1, 0.6)),
                                dict(background="stripes"), dict(jitter=2.0),
                                dict(rotation=-0.5), dict(rotation=1.5)])
def test_bad_look_values_are_refused(kw):
    with pytest.raises(ValueError):
        render_shape_image(0, size=32, **kw)


def test_rotation_zero_draws_upright_shapes_and_one_keeps_the_old_images():
    look = dict(size=32, texture=0.0, noise=0.0, background="flat", jitter=0.0, scale=(0.45, 0.45))

    def mask(label, seed, **kw):  # the object's pixels: those unlike the top-left (background) colour
        img = render_shape_image(label, seed=seed, **look, **kw).astype(int)
        return np.abs(img - img[0, 0]).sum(-1) > 30

    # a square with any seed is axis-aligned when upright: its rows and columns are full or empty, no diagonals
    for seed in range(4):
        m = mask(1, seed, rotation=0.0)
        rows = m.sum(1)[m.any(1)]
        assert rows.max() - np.median(rows) <= 2 and rows.min() >= rows.max() - 4, rows
    # upright, every seed draws the same star (only the colours change: a few anti-aliased edge pixels of ~310
    # fall either side of the threshold); turned, the outlines differ by ~90-230 pixels
    def outline_change(**kw):
        return max(int((mask(5, s, **kw) != mask(5, 0, **kw)).sum()) for s in range(1, 6))

    assert outline_change(rotation=0.0) <= 10 and outline_change(rotation=1.0) >= 50
    # rotation=1 (the default) is the generator as before: the same bytes
    assert (render_shape_image(3, seed=7, rotation=1.0) == render_shape_image(3, seed=7)).all()
