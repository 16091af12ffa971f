"""A LightningDiT-style backbone written as a dcae15 plug-in: SwiGLU, RMSNorm, 2-D RoPE, qk-norm, adaLN-Zero.

Standalone PyTorch (no dcae15 import): train it on a latent store with

    diffusion:
      backbones: ["examples.lightning_dit:lightning_dit_tiny"]
      train: {objective: flow}

The factory receives ``in_channels``, ``input_size`` and ``num_classes`` from the store plus
``diffusion.train.model_overrides`` (e.g. ``{hidden: 384, depth: 12, heads: 6}``). See docs/backbones.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LightningDiT", "lightning_dit", "lightning_dit_tiny"]


#################################################################################
#                              Embedding helpers                                #
#################################################################################

def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of model time t (B,) in [0, 1000], computed in fp32 -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope_2d(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (T, head_dim/2) of a 2-D rotary embedding: the first half of each head's pairs rotates with
    the token's row, the second half with its column."""
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be divisible by 4 for a 2-D rotary embedding")
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (hd/4,)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (T, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, T, hd) by the angles of each token."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, hd/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, hd/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, H, T, hd)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                 Core blocks                                   #
#################################################################################

class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with the hidden width at 2/3 of mlp_ratio * dim (same parameters as a GELU MLP)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * dim * mlp_ratio / 3)
        self.w13 = nn.Linear(dim, 2 * hidden)  # w1 and w3 as one matmul
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(a) * b)  # (B, T, D)


class RopeAttention(nn.Module):
    """Multi-head self-attention with RMSNorm on queries and keys (qk-norm) and 2-D RoPE."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class LightningBlock(nn.Module):
    """Pre-norm transformer block: RMSNorm + adaLN-Zero modulation, RoPE attention, SwiGLU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = RopeAttention(dim, heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=1)  # (B, D) each
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1), cos, sin)  # (B, T, D)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))  # (B, T, D)


#################################################################################
#                                   The model                                   #
#################################################################################

class LightningDiT(nn.Module):
    """Class-conditional LightningDiT-style network; ``forward(x, t, y)`` returns a tensor shaped like ``x``.

    Patch size 1 on DC-AE latents (one token per latent pixel); label ``num_classes`` is the null class.
    """

    def __init__(self, *, in_channels: int, input_size: tuple[int, int], num_classes: int, hidden: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, label_embed_std: float = 0.02):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.in_channels, self.grid = in_channels, tuple(input_size)
        self.x_embed = nn.Linear(in_channels, hidden)
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # +1: the null class (CFG)
        cos, sin = rope_2d(hidden // heads, *self.grid)
        self.register_buffer("rope_cos", cos, persistent=False)  # recomputed, never checkpointed
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(LightningBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.RMSNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, in_channels)
        self.label_embed_std = label_embed_std
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Xavier-uniform every linear, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=self.label_embed_std)
        # adaLN-Zero: every block and the output start as the identity / zero.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        for m in (self.ada_out[-1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def blocks_to_shard(self) -> list[nn.Module]:
        """FSDP2's per-block units (also what activation checkpointing and compile wrap)."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) model time in [0, 1000] (kept fp32), y (B,) int64 in [0, num_classes]."""
        b, c, h, w = x.shape
        dtype = self.x_embed.weight.dtype  # bf16 under FSDP2's policy, which leaves the root's inputs as they are
        tokens = self.x_embed(x.to(dtype).flatten(2).transpose(1, 2))  # (B, T, D)
        cond = self.t_embed(timestep_features(t, 256).to(dtype)) + self.y_embed(y)  # (B, D)
        for blk in self.blocks:
            tokens = blk(tokens, cond, self.rope_cos, self.rope_sin)  # (B, T, D)
        shift, scale = self.ada_out(cond).chunk(2, dim=1)  # (B, D) each
        out = self.out(modulate(self.norm_out(tokens), shift, scale))  # (B, T, C)
        return out.transpose(1, 2).reshape(b, c, h, w).contiguous()  # (B, C, H, W), not a view of out


#################################################################################
#                                  Factories                                    #
#################################################################################

def lightning_dit(*, in_channels: int, input_size: tuple[int, int], num_classes: int, **kw) -> LightningDiT:
    """The plug-in factory: LightningDiT-B-ish defaults (384 wide, 12 deep, 6 heads); ``kw`` overrides them."""
    return LightningDiT(in_channels=in_channels, input_size=input_size, num_classes=num_classes, **kw)


def lightning_dit_tiny(*, in_channels: int, input_size: tuple[int, int], num_classes: int, **kw) -> LightningDiT:
    """A CPU-sized one for tests and the demo (label embedding std 1.0 so a short run conditions on the class)."""
    kw = {"hidden": 64, "depth": 2, "heads": 4, "label_embed_std": 1.0, **kw}
    return LightningDiT(in_channels=in_channels, input_size=input_size, num_classes=num_classes, **kw)
