"""Figures as PNG bytes: matplotlib on its display-free backend, and a figure rendered to bytes (then closed)."""

from __future__ import annotations

import io

__all__ = ["png_bytes", "pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display: works in workers and on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, *, dpi: int = 100, tight: bool = False) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps no reference). ``tight``: crop to the content."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    return buf.getvalue()
