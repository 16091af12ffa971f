"""LPIPS with its torchvision backbone loaded from a local file (find_weights); it never downloads anything."""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import torch
from torch import nn

from dcae15.weights import MissingWeightsError, find_weights

__all__ = ["BACKBONE_FILES", "build_lpips", "MissingWeightsError"]

# The file names torchvision's model zoo uses; lpips' trunks are these networks' ``features``.
BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def build_lpips(net: str = "vgg", *, weights: str | os.PathLike | None = None, random_backbone: bool = False) -> nn.Module:
    """An ``lpips.LPIPS`` network (eval mode, frozen) whose trunk comes from a local torchvision weight file.

    The trunk is always constructed un-pretrained (``pnet_rand=True``), so torchvision's download path is never
    reached; the ImageNet weights are then copied in from ``weights`` / ``$DCAE15_WEIGHTS`` / the torch hub cache.
    The linear calibration heads ship inside the ``lpips`` package.

    Args:
        net: "vgg" (the usual AE-training choice), "alex" (the usual metric) or "squeeze".
        weights: explicit path to the torchvision file (or a directory holding it).
        random_backbone: tests only: keep the randomly initialised trunk (its numbers are meaningless).

    Raises:
        ValueError: unknown ``net``.
        MissingWeightsError: the backbone file is not on this machine (names the file).
    """
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net={net!r}; allowed: {sorted(BACKBONE_FILES)}")
    path = None
    if not random_backbone:
        path = find_weights(BACKBONE_FILES[net], explicit=weights, what=f"LPIPS {net} backbone (torchvision ImageNet)")
    import lpips

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" noise
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        _load_trunk(model.net, torch.load(path, map_location="cpu", weights_only=True), path)
    return model.eval().requires_grad_(False)


def _load_trunk(trunk: nn.Module, tv_state: dict[str, torch.Tensor], path) -> None:
    """Copy torchvision ``features.<i>.<param>`` weights into lpips' ``slice<k>.<i>.<param>`` layout."""
    mapped = {}
    for key in trunk.state_dict():
        _, idx, rest = key.split(".", 2)  # slice1.0.weight -> ("slice1", "0", "weight")
        src = f"features.{idx}.{rest}"
        if src not in tv_state:
            raise ValueError(f"{path} is not a torchvision {type(trunk).__name__} checkpoint: key {src!r} missing")
        mapped[key] = tv_state[src]
    trunk.load_state_dict(mapped, strict=True)
