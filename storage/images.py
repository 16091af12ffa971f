"""Image decoding with named failure reasons, and the ADM/DiT centre crop used for AE training and encoding."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["BadImageError", "CENTER_CROP", "decode_image", "center_crop", "MAX_PIXELS"]

#: The name stores, references and store ids record for :func:`center_crop`'s preprocessing.
CENTER_CROP = "adm-center"

#: Images with more pixels than this are refused before decoding (decompression bombs); ~ 16k × 11k.
MAX_PIXELS = 178_956_970


class BadImageError(ValueError):
    """An input that cannot be turned into an RGB image; ``reason`` is a short phrase for the index."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, 16/32-bit greys are rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1.0 else 1.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image, converting grayscale/CMYK/alpha/palette/16-bit inputs.

    Raises:
        BadImageError: empty data, not an image, truncated/corrupt data, or more than ``max_pixels`` pixels;
            ``.reason`` says which.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = bytes(data[:16])
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary"
        raise BadImageError(f"not an image ({kind} data starting {head[:8]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
        raise BadImageError(f"unreadable header: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadImageError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if w < 1 or h < 1:
        raise BadImageError(f"empty image ({w}x{h})")
    try:
        # Truncated files must fail, not decode to a grey bottom: Pillow only allows them when asked to.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        img.seek(0)
        img.load()
    except OSError as exc:
        msg = str(exc)
        reason = "truncated image data" if "truncat" in msg.lower() else f"corrupt image data: {msg}"
        raise BadImageError(reason) from None
    except Exception as exc:  # noqa: BLE001
        raise BadImageError(f"corrupt image data: {type(exc).__name__}: {exc}") from None
    return _to_rgb(img)


def center_crop(pil: Image.Image, size: int) -> np.ndarray:
    """ADM/DiT preprocessing: halve with a box filter while the short side is >= 2·size, resize the short side
    to ``size`` with bicubic, centre-crop to ``size``×``size``.

    Returns:
        uint8 ``[size, size, 3]``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if pil.mode != "RGB":
        pil = _to_rgb(pil)
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(max(size, round(x * scale)) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])
