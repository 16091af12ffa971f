"""The shapes generator's look options: texture, noise, size, background and position are what they say."""

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
                                dict(background="stripes"), dict(jitter=2.0)])
def test_bad_look_values_are_refused(kw):
    with pytest.raises(ValueError):
        render_shape_image(0, size=32, **kw)
