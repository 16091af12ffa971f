"""Analytic matmul FLOPs of the backbones (closed form: instant at any size, unlike counting a traced model).

Counted: every linear / patch-embedding matmul and the two attention matmuls, 2 FLOPs per multiply-add; norms,
activations, softmax and elementwise ops are left out (as in MFU conventions: PaLM, torchtitan). Training = forward
+ backward = 3x forward, except the layers whose input needs no gradient (patch embedding, DiT's first
timestep-MLP layer: 2x). ``tests`` check the
numbers against ``torch.utils.flop_counter`` at small sizes.
"""

from __future__ import annotations

__all__ = ["forward_flops_per_image", "train_flops_per_image_analytic"]

_FREQ_DIM = 256  # DiT's sinusoidal timestep features (dcae15.models.dit.TimestepEmbedder)


def _block_token_flops(d: int, m: int, tokens: int) -> int:
    """Per token of one transformer block: qkv + proj + MLP weights, and QK^T + AV over ``tokens`` keys."""
    return 2 * (4 * d * d + 2 * d * m) + 4 * tokens * d


def _embed_and_rest(mcfg) -> tuple[int, int]:
    """(forward FLOPs of the layers whose input needs no gradient: patch embedding, DiT's first timestep-MLP
    layer; the other forward FLOPs) per image."""
    d, p, c = mcfg.hidden, mcfg.patch_size, mcfg.in_channels
    m = int(d * mcfg.mlp_ratio)
    t = (mcfg.input_size[0] // p) * (mcfg.input_size[1] // p)  # image tokens
    embed = 2 * t * p * p * c * d
    head = 2 * t * d * p * p * c  # output projection of the image tokens
    if mcfg.arch == "dit":
        per_image = 2 * d * d + mcfg.depth * 2 * d * 6 * d + 2 * d * 2 * d  # t-MLP 2nd layer, adaLNs
        return embed + 2 * _FREQ_DIM * d, head + per_image + mcfg.depth * t * _block_token_flops(d, m, t)
    if mcfg.arch == "uvit":
        n = t + 2  # + time and label tokens
        half = mcfg.depth // 2
        blocks = (2 * half + 1) * n * _block_token_flops(d, m, n) + half * n * 2 * 2 * d * d  # + skip linears
        return embed, head + blocks
    raise ValueError(f"no FLOP formula for arch={mcfg.arch!r}; allowed: ('dit', 'uvit')")


def forward_flops_per_image(mcfg) -> float:
    """Forward matmul FLOPs of one image through ``mcfg`` (a ``dcae15.models.ModelConfig``)."""
    embed, rest = _embed_and_rest(mcfg)
    return float(embed + rest)


def train_flops_per_image_analytic(mcfg, passes: int = 1) -> float:
    """Forward + backward matmul FLOPs per training image (``passes`` = 2 when ADT adds the full objective: every
    image goes through the model twice)."""
    embed, rest = _embed_and_rest(mcfg)
    return float(passes * (2 * embed + 3 * rest))
