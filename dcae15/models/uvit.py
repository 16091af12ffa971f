"""U-ViT backbone (Bao et al.): time and label as 2 prepended tokens, long skips; USiT is this net + flow."""

from __future__ import annotations

import torch
from torch import nn

from dcae15.models.layers import Attention, Mlp, PatchEmbed, output_rows, timestep_embedding, unpatchify

__all__ = ["UViT"]


#################################################################################
#                                 Core blocks                                   #
#################################################################################

class UViTBlock(nn.Module):
    """Pre-norm transformer block; an out-block first fuses its long skip with a linear on the concatenation."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * hidden, hidden) if skip else None
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, T, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # (B, T, D)


#################################################################################
#                                   The model                                   #
#################################################################################

class UViT(nn.Module):
    """Class-conditional U-ViT (DC-AE variant: no final conv, no time MLP, qkv without bias by default)."""

    extras = 2  # time token + label token

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c, d, p = cfg.in_channels, cfg.hidden, cfg.patch_size
        self.grid = (cfg.input_size[0] // p, cfg.input_size[1] // p)
        num_tokens = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(c, d, p)
        self.label_emb = nn.Embedding(cfg.num_classes + 1, d)  # +1: null class
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_tokens, d))
        half = cfg.depth // 2
        blk = lambda skip: UViTBlock(d, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, skip)  # noqa: E731
        self.in_blocks = nn.ModuleList(blk(False) for _ in range(half))
        self.mid_block = blk(False)
        self.out_blocks = nn.ModuleList(blk(True) for _ in range(half))
        self.norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, p * p * c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # U-ViT recipe: truncated normal (0.02) for linears and the position embedding, unit LayerNorms.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.label_embed_std is not None:  # else torch's N(0, 1), as U-ViT leaves it
            nn.init.normal_(self.label_emb.weight, std=self.cfg.label_embed_std)

    @property
    def blocks_to_shard(self) -> list[nn.Module]:
        """Units for per-block FSDP sharding / activation checkpointing."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """x (B, C or c', H, W), t (B,) in [0, 1000], y (B,) int in [0, num_classes] -> (B, same C, H, W).

        ``channels=c'``: official ADT slicing of the input embedding and of the output projection rows.
        """
        p, c, d = self.cfg.patch_size, self.cfg.in_channels, self.cfg.hidden
        x = self.patch_embed(x, channels)  # (B, T, D)
        time_tok = timestep_embedding(t, d).to(x.dtype)[:, None]  # (B, 1, D)
        label_tok = self.label_emb(y)[:, None]  # (B, 1, D)
        x = torch.cat([label_tok, time_tok, x], dim=1) + self.pos_embed  # (B, 2+T, D)
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())  # (B, 2+T, D)
        x = self.norm(x)[:, self.extras:]  # (B, T, D)
        if channels is None:
            out_c, x = c, self.decoder_pred(x)
        else:
            rows = output_rows(c, channels, p).to(x.device)
            out_c = channels
            x = nn.functional.linear(x, self.decoder_pred.weight[rows], self.decoder_pred.bias[rows])
        return unpatchify(x, out_c, p, *self.grid)  # (B, out_c, H, W)
