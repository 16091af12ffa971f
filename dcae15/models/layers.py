"""Building blocks shared by the DiT and UViT backbones: embeddings, SDPA attention, MLP, (un)patchify."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "timestep_embedding",
    "sincos_pos_embed_2d",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "unpatchify",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` [B] -> [B, dim] (cos first, as ADM/DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_h*grid_w, dim] (MAE/DiT layout: half rows, half columns)."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for a 2-D sin-cos position embedding")
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one(xs), one(ys)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patch embedding; ``channels=c'`` uses only the first c' input channels' weights (official ADT slicing)."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        # the input follows the weights' dtype (bf16 under FSDP2's policy, whose root does not cast inputs so that
        # the timesteps stay fp32); a no-op in fp32 and under autocast
        x = x.to(self.proj.weight.dtype)
        if channels is None:
            x = self.proj(x)  # (B, D, H/p, W/p)
        else:  # x holds only the first `channels` channels; the bias is kept
            x = F.conv2d(x, self.proj.weight[:, :channels], self.proj.bias, stride=self.patch)
        return x.flatten(2).transpose(1, 2)  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with GELU (tanh approximation for DiT, exact for UViT)."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def unpatchify(x: torch.Tensor, channels: int, patch: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Tokens (B, T, p*p*C) with (p1 p2 C) order -> image (B, C, H, W)."""
    b = x.shape[0]
    x = x.view(b, grid_h, grid_w, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid_h * patch, grid_w * patch)
    return x.clone() if x._base is not None else x  # a fresh tensor: FSDP2 warns about returning views


def output_rows(channels: int, keep: int, patch: int) -> torch.Tensor:
    """Indices of the output-projection rows that produce the first ``keep`` channels ((p1 p2 C) layout)."""
    rows = torch.arange(patch * patch * channels).view(patch * patch, channels)
    return rows[:, :keep].reshape(-1)
