"""DiT backbone (Peebles & Xie): adaLN-Zero transformer blocks over latent patches; SiT is this net + flow."""

from __future__ import annotations

import torch
from torch import nn

from dcae15.models.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    output_rows,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)

__all__ = ["DiT"]


#################################################################################
#                               Embedding layers                                #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency features -> 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                 Core blocks                                   #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_msa, sc_msa))  # (B, T, D)
        return x + g_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh_mlp, sc_mlp))  # (B, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear projection back to patch pixels."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        if rows is None:
            return self.linear(x)  # (B, T, p*p*C)
        return nn.functional.linear(x, self.linear.weight[rows], self.linear.bias[rows])  # sliced rows (ADT)


#################################################################################
#                                   The model                                   #
#################################################################################

class DiT(nn.Module):
    """Class-conditional DiT; ``forward(x, t, y)`` predicts a tensor shaped like ``x``.

    Label ``num_classes`` is the null class (classifier-free guidance); label dropout is the trainer's job.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c, d, p = cfg.in_channels, cfg.hidden, cfg.patch_size
        self.grid = (cfg.input_size[0] // p, cfg.input_size[1] // p)
        self.x_embedder = PatchEmbed(c, d, p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)  # +1: null class
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, *self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, p, c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Xavier-uniform every linear, zero biases (DiT recipe).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Patch embedding like a linear layer.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        std = self.cfg.label_embed_std
        nn.init.normal_(self.y_embedder.weight, std=0.02 if std is None else std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        # Output starts at zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def blocks_to_shard(self) -> list[nn.Module]:
        """Units for per-block FSDP sharding / activation checkpointing."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """x (B, C or c', H, W), t (B,) in [0, 1000], y (B,) int in [0, num_classes] -> (B, same C, H, W).

        ``channels=c'`` is the official ADT slicing: x holds only the first c' channels, the input embedding uses
        the first c' weight columns and the output projection only the rows of those channels.
        """
        p, c = self.cfg.patch_size, self.cfg.in_channels
        x = self.x_embedder(x, channels) + self.pos_embed.to(x.dtype)  # (B, T, D)
        cond = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for blk in self.blocks:
            x = blk(x, cond)  # (B, T, D)
        rows = None if channels is None else output_rows(c, channels, p).to(x.device)
        out_c = c if channels is None else channels
        x = self.final_layer(x, cond, rows)  # (B, T, p*p*out_c)
        return unpatchify(x, out_c, p, *self.grid)  # (B, out_c, H, W)
