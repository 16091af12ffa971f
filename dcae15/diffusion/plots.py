"""Figures of a diffusion run: its samples as a grid (a row per shown class, class names on the side; a bounded
set of classes) and its loss curve."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np

from dcae15.figures import png_bytes, pyplot

__all__ = ["GRID_CLASSES", "GRID_PER_CLASS", "MAX_GRID_CLASSES", "grid_classes", "collect_grid_images",
           "display_names", "read_class_names", "rows_filled", "sample_grid_png", "loss_curve_png"]

GRID_CLASSES = 16
"""Rows of a sample grid by default: every class up to this many, else this many spread over the class list."""
MAX_GRID_CLASSES = 100
"""The most rows a grid draws: the canvas (and the PNG) stays a bounded size whatever the class count."""
GRID_PER_CLASS = 10
"""Images in every row of a run's sample grid."""


def read_class_names(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """A ``LOC_synset_mapping.txt``-style file (``<wnid> <name>[, <synonym>...]`` per line, as ImageNet's devkit and
    Kaggle's copy of it ship) as ``{wnid: first name}`` (``n01440764 tench, Tinca tinca`` -> ``tench``).

    Raises:
        ValueError: a non-empty line without a name after its id (names the line).
    """
    from storage.urls import read_bytes

    out: dict[str, str] = {}
    for i, line in enumerate(read_bytes(url, storage_options).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        name = names.split(",")[0].strip()
        if not name:
            raise ValueError(f"{url} line {i}: expected '<wnid> <name>[, ...]', got {line!r}")
        out[wnid] = name
    return out


def display_names(class_ids: Sequence[str], mapping: dict[str, str] | None = None) -> list[str]:
    """The label of each class in figures: its human-readable name where ``mapping`` has one, else its id (wnid)."""
    return [mapping.get(str(c), str(c)) if mapping else str(c) for c in class_ids]


def rows_filled(labels: np.ndarray, classes: Sequence[int], per_class: int) -> bool:
    """Whether every one of ``classes`` has at least ``per_class`` of ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=max(classes) + 1) if len(labels) else None
    return counts is not None and all(counts[c] >= per_class for c in classes)


def grid_classes(num_classes: int, classes: Sequence[int] | None = None) -> list[int]:
    """The class indices a sample grid shows: ``classes`` when given (checked), else all of them when there are at
    most :data:`GRID_CLASSES`, else :data:`GRID_CLASSES` evenly spread ones (0, 66, 133, ... for ImageNet's 1000).

    Raises:
        ValueError: an index out of range, a repeated one, or more than :data:`MAX_GRID_CLASSES`.
    """
    if num_classes < 1:
        raise ValueError(f"need at least one class, got {num_classes}")
    if classes is None:
        if num_classes <= GRID_CLASSES:
            return list(range(num_classes))
        return sorted({int(round(v)) for v in np.linspace(0, num_classes - 1, GRID_CLASSES)})
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad or not out or len(set(out)) != len(out) or len(out) > MAX_GRID_CLASSES:
        raise ValueError(f"grid classes must be 1..{MAX_GRID_CLASSES} distinct indices in [0, {num_classes}), got "
                         f"{out[:20]}{' ...' if len(out) > 20 else ''}")
    return out


def collect_grid_images(batches: Iterable[tuple[np.ndarray, np.ndarray]], classes: Sequence[int], *,
                        per_class: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each of ``classes`` from a stream of (uint8 images [n,H,W,3], labels [n])
    batches, e.g. a sample store unit by unit; stops reading once every class is full. Memory: the kept images
    plus one batch, whatever the stream's length. A class with no sample gets an empty row in the grid."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    want = {int(c): [] for c in classes}
    full, shape = 0, None
    for images, labels in batches:
        shape = images.shape[1:]
        for i, c in enumerate(np.asarray(labels).tolist()):
            kept = want.get(int(c))
            if kept is not None and len(kept) < per_class:
                kept.append(np.array(images[i]))  # a copy: the batch is dropped after this loop
                full += len(kept) == per_class
        if full == len(want):
            break
    picked = [(c, im) for c, ims in want.items() for im in ims]
    if shape is None:
        raise ValueError("no samples to draw: the stream of batches is empty")
    images = np.stack([im for _, im in picked]) if picked else np.zeros((0, *shape), np.uint8)  # empty rows
    return images, np.asarray([c for c, _ in picked], dtype=np.int64)


def sample_grid_png(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                    classes: Sequence[int] | None = None, per_class: int = 10, title: str = "",
                    scale: int | None = None) -> bytes:
    """A PNG of uint8 images [N,H,W,3]: one row per shown class (its name on the left), up to ``per_class`` images
    of that class in the order they come; an empty cell where a class has fewer.

    Args:
        classes: the class indices to show (see :func:`grid_classes`: default all of up to 16 classes, else 16
            spread ones); at most :data:`MAX_GRID_CLASSES` rows, so a 1000-class run draws a bounded figure.
        scale: screen pixels per image pixel; None = 2 for images up to 64 px, else 1.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise ValueError(f"need uint8 images [N,H,W,3] and N labels, got {images.shape} and {labels.shape}")
    rows = grid_classes(len(class_names), classes)
    h, w = images.shape[1:3]
    scale = scale if scale is not None else (2 if max(h, w) <= 64 else 1)
    pad = 2
    canvas = np.full((len(rows) * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, c in enumerate(rows):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            y0, x0 = pad + r * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = images[i]
    # Drawn with PIL, not matplotlib: imshow resamples through float RGBA copies (~1 GB for 16 rows at 256 px);
    # here the memory is the canvas itself.
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    font = ImageFont.load_default(size=11)
    labels_txt = [str(class_names[c]) for c in rows]
    left = 8 + max(int(font.getlength(t)) for t in labels_txt)
    top = 22 if title else 4
    out = Image.new("RGB", (left + grid.width + 4, top + grid.height + 4), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels_txt):
        y = top + (pad + r * (h + pad) + h / 2) * scale
        draw.text((left - 4, y), text, fill="black", font=font, anchor="rm")
    if title:
        draw.text((out.width / 2, 4), title, fill="black", font=font, anchor="ma")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def loss_curve_png(rows: Sequence[dict], *, title: str = "", key: str = "loss") -> bytes:
    """A PNG of ``key`` vs ``step`` from a run's metrics rows (``metrics.jsonl``), log-scale y, with the learning
    rate on a second axis when the rows have ``lr``."""
    plt = pyplot()

    pts = [(int(r["step"]), float(r[key])) for r in rows if key in r and "step" in r]
    if not pts:
        raise ValueError(f"no rows with 'step' and {key!r} to plot")
    steps, values = map(np.asarray, zip(*sorted(pts)))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, values, color="C0", label=key)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    lrs = [(int(r["step"]), float(r["lr"])) for r in rows if "lr" in r and "step" in r]
    if lrs:
        ax2 = ax.twinx()
        s, v = map(np.asarray, zip(*sorted(lrs)))
        ax2.plot(s, v, color="C1", alpha=0.6, lw=1)
        ax2.set_ylabel("lr", color="C1")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
