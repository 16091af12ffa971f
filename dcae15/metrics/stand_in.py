"""Stand-in weight files in the real files' formats (random values, seeded): the offline loading paths of the FID
Inception and of the LPIPS backbone run for real where the ImageNet weights cannot be downloaded (the rehearsal,
tests). Every number they produce is meaningless; results record the file's fingerprint, never the real one's."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
import torch_fidelity.feature_extractor_inceptionv3 as fe
import torchvision

from dcae15.metrics.extractor import INCEPTION_NAME, INCEPTION_WEIGHTS
from dcae15.metrics.lpips_offline import BACKBONE_FILES

__all__ = ["write_stand_in_inception", "write_stand_in_vgg", "write_stand_in_weights"]


def write_stand_in_inception(folder: str | os.PathLike, seed: int = 0) -> Path:
    """``<folder>/weights-inception-2015-12-05-6726825d.pth``: torch-fidelity's InceptionV3 state dict (its 566
    keys and shapes), randomly initialised with ``seed``."""
    class _Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init: there is no file to load yet
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(seed)
    net = _Unloaded(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=empty)
    path = Path(folder) / INCEPTION_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def write_stand_in_vgg(folder: str | os.PathLike, seed: int = 0) -> Path:
    """``<folder>/vgg16-397923af.pth``: torchvision's VGG16 ``features.*`` keys (the trunk LPIPS loads), random."""
    torch.manual_seed(seed)
    trunk = torchvision.models.vgg16().features
    path = Path(folder) / BACKBONE_FILES["vgg"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
    return path


def write_stand_in_weights(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Both files in ``folder`` (made once; existing files are kept) — point ``$DCAE15_WEIGHTS`` at it."""
    folder = Path(folder)
    if not (folder / INCEPTION_WEIGHTS).exists():
        write_stand_in_inception(folder, seed)
    if not (folder / BACKBONE_FILES["vgg"]).exists():
        write_stand_in_vgg(folder, seed)
    return folder
