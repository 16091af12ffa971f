"""Pictures of a structured latent space: Figure 3 grid (reconstruction from the first c' channels), Figure 2
(channel-wise mean of the latent), and PSNR against c'. Each returns PNG bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dcae15.figures import png_bytes, pyplot

__all__ = ["recon_grid_png", "channel_mean_png", "metric_curve_png"]


def _figure(rows: int, cols: int, cell: float = 1.6):
    plt = pyplot()

    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    return fig, axes


def _input_grid_png(originals: np.ndarray, columns: Sequence[tuple[str, Callable]], title: str) -> bytes:
    """One row per image: the input, then one column per ``(heading, draw)``; ``draw(ax, i)`` fills row i's cell."""
    fig, axes = _figure(len(originals), 1 + len(columns))
    for i, img in enumerate(originals):
        axes[i, 0].imshow(img)
        for j, (_, draw) in enumerate(columns, 1):
            draw(axes[i, j], i)
    axes[0, 0].set_title("input", fontsize=8)
    for j, (heading, _) in enumerate(columns, 1):
        axes[0, j].set_title(heading, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return png_bytes(fig, dpi=110, tight=True)


def recon_grid_png(originals: np.ndarray, recons: Mapping[int, np.ndarray], title: str = "") -> bytes:
    """Figure 3: one row per image — the original, then its reconstruction from the first c' channels per column.

    Args:
        originals: uint8 [n,H,W,3].
        recons: c' -> uint8 [n,H,W,3].
    """
    return _input_grid_png(
        originals, [(f"first {c} ch", lambda ax, i, c=c: ax.imshow(recons[c][i])) for c in sorted(recons)], title)


def channel_mean_png(originals: np.ndarray, latents: np.ndarray, channels: Sequence[int], title: str = "") -> bytes:
    """Figure 2: per image, the channel-wise average of the latent over its first c' channels, for each c'.

    Args:
        originals: uint8 [n,H,W,3]; latents: float [n,c,h,w] (unscaled); channels: the c' columns.
    """
    def mean(ax, i, c):
        ax.imshow(latents[i, :c].mean(axis=0), cmap="viridis", interpolation="nearest")

    return _input_grid_png(
        originals, [(f"mean ch 1..{c}", lambda ax, i, c=c: mean(ax, i, c)) for c in channels], title)


def metric_curve_png(channels: Sequence[int], values: Sequence[float], *, metric: str = "PSNR (dB)",
                     title: str = "") -> bytes:
    """A metric (default PSNR) of the reconstruction from the first c' channels against c'."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.plot(list(channels), list(values), marker="o")
    ax.set_xlabel("latent channels used (c')")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return png_bytes(fig, dpi=110, tight=True)
