"""A generated image dataset with real object structure and real detail, for the demo and the tests.

Each class is a shape (circle, square, triangle, ...). Every image draws one object of its class at a random
position, scale and rotation, filled with a random colour and a texture (stripes, checks or noise), on a smooth
random gradient background with fine noise. Structure (what shape, where) and detail (texture, noise) are both
present, which is what the structured latent space separates.

How much detail there is is a choice (``texture``, ``noise``, ``scale``): at 32 px a tiny autoencoder cannot
represent 1.5-4 px stripes or per-pixel noise fills, and a shape 2-3 latent pixels wide is hard for a tiny
diffusion model. The defaults are a toned-down look (texture 0.2, noise 2, radius 0.28-0.45 of the image) that a
tiny AE reconstructs with the class kept; ``texture=1, noise=6, scale=(0.22, 0.38)`` is the original full-detail
look.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "ODD_FILES", "render_shape_image", "make_shapes_dataset", "make_imagenet_tree", "wnid"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon", "bar", "heart")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def regular(n: int, rad: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + rad * math.cos(angle + phase + 2 * math.pi * k / n), cy + rad * math.sin(angle + phase + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "square":
        return regular(4, r, math.pi / 4)
    if kind == "triangle":
        return regular(3, r, -math.pi / 2)
    if kind == "diamond":
        return [(cx + (x - cx) * 0.6, y) for x, y in regular(4, r, 0.0)]
    if kind == "hexagon":
        return regular(6, r)
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = angle - math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if kind in ("cross", "bar"):
        w = r * 0.35
        arms = [(-r, -w), (r, -w), (r, w), (-r, w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arms]
    if kind == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + r * x / 17, cy + r * y / 17))
        return pts
    raise ValueError(f"unknown polygon kind {kind!r}")


def _texture(rng: np.random.Generator, size: int, base: np.ndarray, level: float) -> np.ndarray:
    """A textured fill: stripes, checks or noise around a base colour, amplitude x ``level``. Float [S,S,3], 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3, 8) * size / 64
        wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    elif kind == 1:
        period = max(2.0, rng.uniform(3, 8) * size / 64)
        wave = np.sign(np.sin(math.pi * xx / period) * np.sin(math.pi * yy / period))
    else:
        wave = rng.standard_normal((size, size)).astype(np.float32)
    amp = rng.uniform(20, 60) * level
    return np.clip(base[None, None, :] + amp * wave[..., None], 0, 255)


BACKGROUNDS = ("gradient", "flat")


def _check_look(texture: float, noise: float, scale: tuple[float, float], background: str = "gradient",
                jitter: float = 1.0, rotation: float = 1.0) -> tuple[float, float]:
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter (how far the object may move off-centre, 0..1 of the room it has) must be in "
                         f"[0, 1], got {jitter}")
    if not 0.0 <= rotation <= 1.0:
        raise ValueError(f"rotation (how far the object may turn, 0 = upright .. 1 = any angle) must be in [0, 1], "
                         f"got {rotation}")
    lo, hi = (float(v) for v in scale)
    if not 0.0 <= texture <= 1.0:
        raise ValueError(f"texture must be in [0, 1] (0 = flat fill, 1 = full stripes/checks/noise), got {texture}")
    if noise < 0:
        raise ValueError(f"noise (background noise std, 0..255 scale) must be >= 0, got {noise}")
    if not 0.05 <= lo <= hi <= 0.5:
        raise ValueError(f"scale (object radius as a fraction of the image) must satisfy 0.05 <= lo <= hi <= 0.5, "
                         f"got {scale}")
    return lo, hi


def render_shape_image(label: int, size: int = 64, seed: int = 0, *, texture: float = 0.2, noise: float = 2.0,
                       scale: tuple[float, float] = (0.28, 0.45), background: str = "gradient",
                       jitter: float = 1.0, rotation: float = 1.0) -> np.ndarray:
    """Render one image of class ``label`` as uint8 [size, size, 3], deterministic in (label, size, seed, look).

    Args:
        texture: amplitude of the object's fill texture, 0 (flat colour) .. 1 (full).
        noise: std of the background's per-pixel noise (0..255 scale).
        scale: (min, max) object radius as a fraction of the image size.
        background: "gradient" (two random colours) or "flat" (one random colour).
        jitter: 1 = the object anywhere it fits, 0 = centred.
        rotation: 1 = the object turned by any angle, 0 = upright (a square's sides and a cross's arms
            axis-aligned, a triangle and a star pointing up); in between, up to that fraction of a full turn.
    """
    if not 0 <= label < len(SHAPES):
        raise ValueError(f"label must be in [0, {len(SHAPES)}), got {label}")
    lo, hi = _check_look(texture, noise, scale, background, jitter, rotation)
    rng = np.random.default_rng([seed, label, size])
    ss = 4  # supersampling for anti-aliased edges
    big = size * ss
    # background: smooth two-colour gradient + fine noise
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if background == "flat":
        c1 = c0
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    g = (xx * math.cos(theta) + yy * math.sin(theta) + 1) / 2
    bg = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]
    bg += rng.normal(0, 1, bg.shape) * noise
    # object: shape mask drawn at high resolution then box-downsampled
    r = rng.uniform(lo, hi) * big
    cx, cy = (big / 2 + jitter * (rng.uniform(r, big - r) - big / 2) for _ in range(2))
    angle = rotation * rng.uniform(0, 2 * math.pi)  # drawn at every rotation: the other draws stay the same
    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    kind = SHAPES[label]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif kind == "cross":
        draw.polygon(_polygon("cross", cx, cy, r, angle), fill=255)
        draw.polygon(_polygon("cross", cx, cy, r, angle + math.pi / 2), fill=255)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=255)
    mask = np.asarray(mask_img.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0
    # keep the object distinct from the background colour
    base = rng.uniform(0, 255, 3)
    if np.abs(base - bg.mean((0, 1))).sum() < 120:
        base = 255 - base
    fg = _texture(rng, size, base, texture)
    img = bg * (1 - mask) + fg * mask
    return np.clip(img, 0, 255).round().astype(np.uint8)


def make_shapes_dataset(
    root: str,
    *,
    num_classes: int = 8,
    per_class: int = 64,
    size: int = 64,
    seed: int = 0,
    fmt: str = "png",
    texture: float = 0.2,
    noise: float = 2.0,
    scale: tuple[float, float] = (0.28, 0.45),
    background: str = "gradient",
    jitter: float = 1.0,
    rotation: float = 1.0,
    storage_options: dict | None = None,
) -> str:
    """Write an ImageNet-style class-folder tree ``root/<class>/<class>_<i>.<fmt>`` of generated images.

    Deterministic in (num_classes, per_class, size, seed, look). Existing files are overwritten with identical
    bytes. ``texture``, ``noise``, ``scale``, ``background``, ``jitter``, ``rotation``: see
    :func:`render_shape_image`.

    Returns:
        ``root``.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
    if fmt not in ("png", "jpg"):
        raise ValueError(f"fmt must be 'png' or 'jpg', got {fmt!r}")
    if per_class < 1 or size < 8:
        raise ValueError(f"per_class must be >= 1 and size >= 8, got {per_class}, {size}")
    _check_look(texture, noise, scale, background, jitter, rotation)
    import fsspec

    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    for label in range(num_classes):
        name = f"{label:02d}_{SHAPES[label]}"
        fs.makedirs(f"{base}/{name}", exist_ok=True)
        for i in range(per_class):
            arr = render_shape_image(label, size=size, seed=seed * 1_000_003 + i, texture=texture, noise=noise,
                                     scale=scale, background=background, jitter=jitter,
                                     rotation=rotation)
            buf = io.BytesIO()
            if fmt == "png":
                Image.fromarray(arr).save(buf, format="PNG")
            else:
                Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            with fs.open(f"{base}/{name}/{SHAPES[label]}_{i:05d}.{fmt}", "wb") as f:
                f.write(buf.getvalue())
    return root


# The odd files a real ImageNet train split holds (22 CMYK JPEGs, a PNG named .JPEG, greyscale ones), plus the
# broken ones a copy can hold (a truncated file, an empty one): where they go in the generated tree.
ODD_FILES = ("cmyk", "grayscale", "png_named_jpeg", "truncated", "empty")


def wnid(label: int) -> str:
    """A WordNet-id-shaped folder name for class ``label`` (``n0`` + 7 digits), increasing with the label so that
    sorted folder names give labels 0..N-1 as for ImageNet."""
    return f"n0{1_440_000 + 1_000 * int(label):07d}"


def make_imagenet_tree(
    root: str,
    *,
    num_classes: int = 1000,
    per_class: int = 2,
    size: int = 64,
    seed: int = 0,
    odd: bool = True,
    storage_options: dict | None = None,
) -> dict[str, list[str]]:
    """Write a tree shaped like ImageNet's train split: ``root/<wnid>/<wnid>_<i>.JPEG``, real JPEG files of
    varying (non-square) sizes around ``size`` px, a generated shape per class (shape ``label % 10``, its own colours
    per class), and — with ``odd`` — one each of :data:`ODD_FILES` in the first classes.

    Returns:
        ``{"files": [...], "odd": [...]}``: relative paths written, and those of the odd files (kind in the name).

    Raises:
        ValueError: bad counts or size.
    """
    if num_classes < 1 or per_class < 1 or size < 16:
        raise ValueError(f"num_classes and per_class must be >= 1 and size >= 16, got {num_classes}, {per_class}, {size}")
    import fsspec

    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    rng = np.random.default_rng(seed)
    files, odd_files = [], []
    for label in range(num_classes):
        folder = wnid(label)
        fs.makedirs(f"{base}/{folder}", exist_ok=True)
        for i in range(per_class):
            w, h = (int(size * f) for f in rng.uniform(1.0, 1.5, 2))  # crop and resize paths, as for real photos
            arr = render_shape_image(label % len(SHAPES), size=max(w, h), seed=seed * 1_000_003 + label * 1009 + i)
            img = Image.fromarray(arr[:h, :w])
            rel = f"{folder}/{folder}_{i}.JPEG"
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            with fs.open(f"{base}/{rel}", "wb") as f:
                f.write(buf.getvalue())
            files.append(rel)
    if odd:
        for k, kind in enumerate(ODD_FILES):
            folder = wnid(k % num_classes)
            rel = f"{folder}/{folder}_{kind}.JPEG"
            img = Image.fromarray(render_shape_image(k % len(SHAPES), size=size, seed=seed + k))
            buf = io.BytesIO()
            if kind == "cmyk":
                img.convert("CMYK").save(buf, format="JPEG")
            elif kind == "grayscale":
                img.convert("L").save(buf, format="JPEG")
            elif kind == "png_named_jpeg":
                img.save(buf, format="PNG")
            elif kind == "truncated":
                img.save(buf, format="JPEG")
                buf = io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 3])
            with fs.open(f"{base}/{rel}", "wb") as f:
                f.write(buf.getvalue())  # "empty": zero bytes
            files.append(rel)
            odd_files.append(rel)
    return {"files": files, "odd": odd_files}
