"""Pictures of a structured latent space: Figure 3 grid (reconstruction from the first c' channels), Figure 2
(channel-wise mean of the latent), and PSNR against c'. Each returns PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["recon_grid_png", "channel_mean_png", "metric_curve_png"]


def _figure(rows: int, cols: int, cell: float = 1.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    return fig, axes


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def recon_grid_png(originals: np.ndarray, recons: Mapping[int, np.ndarray], title: str = "") -> bytes:
    """Figure 3: one row per image — the original, then its reconstruction from the first c' channels per column.

    Args:
        originals: uint8 [n,H,W,3].
        recons: c' -> uint8 [n,H,W,3].
    """
    cols = sorted(recons)
    fig, axes = _figure(len(originals), 1 + len(cols))
    for i, img in enumerate(originals):
        axes[i, 0].imshow(img)
        for j, c in enumerate(cols, 1):
            axes[i, j].imshow(recons[c][i])
    axes[0, 0].set_title("input", fontsize=8)
    for j, c in enumerate(cols, 1):
        axes[0, j].set_title(f"first {c} ch", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def channel_mean_png(originals: np.ndarray, latents: np.ndarray, channels: Sequence[int], title: str = "") -> bytes:
    """Figure 2: per image, the channel-wise average of the latent over its first c' channels, for each c'.

    Args:
        originals: uint8 [n,H,W,3]; latents: float [n,c,h,w] (unscaled); channels: the c' columns.
    """
    fig, axes = _figure(len(originals), 1 + len(channels))
    for i, img in enumerate(originals):
        axes[i, 0].imshow(img)
        for j, c in enumerate(channels, 1):
            axes[i, j].imshow(latents[i, :c].mean(axis=0), cmap="viridis", interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=8)
    for j, c in enumerate(channels, 1):
        axes[0, j].set_title(f"mean ch 1..{c}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def metric_curve_png(channels: Sequence[int], values: Sequence[float], *, metric: str = "PSNR (dB)",
                     title: str = "") -> bytes:
    """A metric (default PSNR) of the reconstruction from the first c' channels against c'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.plot(list(channels), list(values), marker="o")
    ax.set_xlabel("latent channels used (c')")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _png(fig)
