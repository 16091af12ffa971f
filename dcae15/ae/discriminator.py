"""PatchGAN (pix2pix NLayer) discriminator and hinge losses for the refinement phase."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NLayerDiscriminator", "hinge_d_loss", "hinge_g_loss"]


class NLayerDiscriminator(nn.Module):
    """Patch discriminator: stride-2 4x4 convs, then two stride-1 convs to a 1-channel logit map.

    GroupNorm instead of BatchNorm: no running statistics, so a resumed run and a multi-rank run behave the same.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1 or base_channels < 8:
            raise ValueError(f"NLayerDiscriminator: num_layers >= 1 and base_channels >= 8, got {num_layers}, {base_channels}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base_channels
        for i in range(1, num_layers + 1):
            nxt = base_channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(ch, nxt, 4, stride, 1, bias=False), nn.GroupNorm(min(32, nxt // 4), nxt),
                       nn.LeakyReLU(0.2, True)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w') patch logits


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
