"""Every bad-image kind is converted or refused with a named reason; the ADM centre crop; [-1, 1] tensors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from storage.images import BadImageError, center_crop, decode_image

RGB = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` × ``height`` (what a decompression bomb looks like)."""
    small = encode(Image.new("L", (8, 8)), "PNG")
    length = struct.unpack(">I", small[8:12])[0]
    ihdr = bytearray(small[16:16 + length])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return small[:16] + bytes(ihdr) + crc + small[16 + length + 4:]


@pytest.mark.parametrize("data,reason", [
    (encode(Image.fromarray(RGB), "JPEG")[:700], "truncated"),
    (b"", "empty file"),
    (b"<html><body>404 Not Found</body></html>\n", "not an image (text"),
    (b"\x00\x01\x02\x03garbage" * 10, "not an image (binary"),
    (png_claiming_size(40_000, 40_000), "decompression bomb"),
])
def test_unreadable_inputs_raise_with_reason(data, reason):
    with pytest.raises(BadImageError) as info:
        decode_image(data)
    assert reason in info.value.reason


def test_bomb_limit_is_configurable():
    data = encode(Image.fromarray(RGB), "PNG")
    with pytest.raises(BadImageError, match="exceeds max_pixels=1000"):
        decode_image(data, max_pixels=1000)


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("LA", "PNG"), ("RGB", "WEBP")])
def test_convertible_modes_become_rgb(mode, fmt):
    img = Image.fromarray(RGB).convert(mode)
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)
    if mode in ("RGBA", "P"):
        np.testing.assert_allclose(np.asarray(out, np.float32).mean(), RGB.mean(), atol=3)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (out == 255).all()


def test_sixteen_bit_png_is_rescaled_not_clipped():
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(data))
    np.testing.assert_array_equal(out[..., 0].ravel(), np.arange(256))


def test_center_crop_matches_adm_reference():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    # ADM: box-halve while short side >= 2*size, bicubic to size, centre crop.
    ref = img
    while min(*ref.size) >= 2 * 64:
        ref = ref.resize(tuple(x // 2 for x in ref.size), resample=Image.BOX)
    scale = 64 / min(*ref.size)
    ref = np.asarray(ref.resize(tuple(round(x * scale) for x in ref.size), resample=Image.BICUBIC))
    top, left = (ref.shape[0] - 64) // 2, (ref.shape[1] - 64) // 2
    np.testing.assert_array_equal(center_crop(img, 64), ref[top:top + 64, left:left + 64])
    assert center_crop(Image.fromarray(RGB[:10, :30]), 16).shape == (16, 16, 3)  # upscaling small images
