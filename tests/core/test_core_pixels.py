"""uint8 pixels <-> model images: two layouts with two names, and the inverse the encoders use."""

import numpy as np
import pytest
import torch

from dcae15.pixels import from_uint8_nhwc, to_uint8, to_uint8_nhwc

RGB = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)


def test_from_uint8_nhwc_range_layout_and_device():
    t = from_uint8_nhwc(RGB)
    assert t.shape == (2, 3, 48, 64) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert t[1, 2, 5, 7] == pytest.approx(RGB[1, 5, 7, 2] / 127.5 - 1)
    assert torch.equal(from_uint8_nhwc(torch.from_numpy(RGB)), t)  # tensors (already on their device) too
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_nhwc(RGB.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_nhwc(RGB[0])


def test_to_uint8_layouts_round_trip():
    x = from_uint8_nhwc(RGB)
    assert torch.equal(to_uint8(x), torch.from_numpy(RGB).permute(0, 3, 1, 2))  # tensor, channels first
    back = to_uint8_nhwc(x)
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8 and np.array_equal(back, RGB)
    assert to_uint8(torch.full((1, 3, 2, 2), 7.0)).unique().tolist() == [255]  # clamped
    u8 = torch.from_numpy(RGB).permute(0, 3, 1, 2)
    assert to_uint8(u8) is u8  # uint8 passes through
