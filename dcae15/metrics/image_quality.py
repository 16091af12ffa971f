"""Per-image reconstruction quality: PSNR and SSIM on uint8-quantised images, LPIPS with offline weights."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dcae15.metrics.lpips_offline import build_lpips
from dcae15.pixels import to_uint8

__all__ = ["psnr", "ssim", "LPIPSMetric"]


def psnr(x: torch.Tensor, y: torch.Tensor, *, max_db: float = 100.0) -> torch.Tensor:
    """PSNR in dB per image (B,) between two image batches, after quantising both to uint8 (the paper's
    convention); identical images give ``max_db``. Average the result over images."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    a, b = to_uint8(x).double(), to_uint8(y).double()
    mse = (a - b).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-12))
    return out.clamp(max=max_db).float()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1,1,k,k)


def ssim(x: torch.Tensor, y: torch.Tensor, *, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (B,) on uint8-quantised images (data range 255), Gaussian window 11 / sigma 1.5, averaged over
    the valid region and the 3 channels (Wang et al. 2004; equals skimage's ``gaussian_weights=True``)."""
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    side = min(x.shape[-2:])
    if side < win_size:  # tiny images: the largest odd window that fits
        win_size = side if side % 2 else side - 1
    a, b = to_uint8(x).double(), to_uint8(y).double()
    c = a.shape[1]
    w = _gaussian_window(win_size, sigma, a.device, a.dtype).expand(c, 1, win_size, win_size)
    filt = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731  valid region only (skimage crops the border too)
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


class LPIPSMetric:
    """LPIPS distance per image (B,) for images in [-1, 1]; backbone weights are found offline (see lpips_offline).

    Args:
        net: "alex" (the metric convention), "vgg" or "squeeze".
        weights: explicit path to the torchvision backbone file.
        random_backbone: tests only; numbers are meaningless.
        device: where to run.
    """

    def __init__(self, net: str = "alex", *, weights: str | os.PathLike | None = None, random_backbone: bool = False,
                 device: str | torch.device = "cpu") -> None:
        self.net_name = net
        self.device = torch.device(device)
        self.model = build_lpips(net, weights=weights, random_backbone=random_backbone).to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
        x = x.to(self.device, torch.float32).clamp(-1, 1)
        y = y.to(self.device, torch.float32).clamp(-1, 1)
        return self.model(x, y).flatten().cpu()
