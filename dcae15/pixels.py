"""uint8 pixels <-> model images (float in [-1, 1], channels first); to uint8 rounds as when saving a PNG.

Two layouts, two names: ``to_uint8`` keeps the tensor layout (B,3,H,W) for metrics on tensors; ``to_uint8_nhwc``
gives the numpy (B,H,W,3) that sample stores, image files and the metrics' array inputs hold; ``from_uint8_nhwc``
is its inverse (what every encoder, trainer and evaluation feeds the autoencoder).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["from_uint8_nhwc", "to_uint8", "to_uint8_nhwc"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B,3,H,W) -> uint8 tensor (B,3,H,W) on the same device. uint8 input passes through."""
    if x.dtype == torch.uint8:
        return x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B,3,H,W) -> uint8 numpy array (B,H,W,3) on the host."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (B,H,W,3) (numpy or tensor) -> float32 tensor (B,3,H,W) in [-1, 1], on the input's device.

    Move uint8 to the device first and convert there: 4x fewer bytes cross the bus than as float.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B,H,W,3], got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
