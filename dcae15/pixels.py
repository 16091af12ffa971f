"""Model images (float in [-1, 1], channels first) to uint8 pixels, rounded as when saving a PNG.

Two layouts, two names: ``to_uint8`` keeps the tensor layout (B,3,H,W) for metrics on tensors; ``to_uint8_nhwc``
gives the numpy (B,H,W,3) that sample stores, image files and the metrics' array inputs hold.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "to_uint8_nhwc"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B,3,H,W) -> uint8 tensor (B,3,H,W) on the same device. uint8 input passes through."""
    if x.dtype == torch.uint8:
        return x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B,3,H,W) -> uint8 numpy array (B,H,W,3) on the host."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
