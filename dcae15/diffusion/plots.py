"""Figures of a diffusion run: its samples as a grid (a row per class, class names on the side) and its loss curve."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dcae15.figures import png_bytes, pyplot

__all__ = ["sample_grid_png", "loss_curve_png"]


def sample_grid_png(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, per_class: int = 10,
                    title: str = "", scale: int = 2) -> bytes:
    """A PNG of uint8 images [N,H,W,3]: one row per class (its name on the left), up to ``per_class`` images of
    that class in the order they come; an empty cell where a class has fewer."""
    plt = pyplot()

    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise ValueError(f"need uint8 images [N,H,W,3] and N labels, got {images.shape} and {labels.shape}")
    n_cls = len(class_names)
    h, w = images.shape[1:3]
    pad = 2
    canvas = np.full((n_cls * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c in range(n_cls):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            y0, x0 = pad + c * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = images[i]
    inch = canvas.shape[1] * scale / 100
    fig, ax = plt.subplots(figsize=(inch + 1.3, canvas.shape[0] * scale / 100 + 0.4))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + c * (h + pad) + h / 2 for c in range(n_cls)], [str(n) for n in class_names], fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


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
