"""Feature extractors for the generation metrics: torch-fidelity's InceptionV3 and the demo's proxy classifier.

The leaf of ``dcae15.metrics``: it imports no other metrics module, and ``fidelity``, ``reference``, ``proxy`` and
``recon_proxy`` import it at top level, so imports run one way. A ``FeatureExtractorSpec`` names a network
registered with torch-fidelity and what every reported number must say about it; ``ProxyNet`` is the proxy's
architecture and ``ProxyFeatureExtractor`` its torch-fidelity wrapper (training it lives in ``dcae15.metrics.proxy``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from dcae15.weights import MissingWeightsError, find_weights
from storage.urls import read_bytes

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_NETWORKS",
    "INCEPTION_WEIGHTS",
    "PYTORCH_FID_INPUT_NAME",
    "PROXY_NAME",
    "SPATIAL",
    "FeatureExtractorSpec",
    "InceptionPytorchFidInput",
    "InceptionWithSpatial",
    "MissingWeightsError",
    "ProxyFeatureExtractor",
    "ProxyNet",
    "inception_extractor",
    "register_proxy_extractor",
]

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
PROXY_NAME = "dcae15-proxy"  # torch-fidelity registry name; the weights file says which trained classifier
SPATIAL = "spatial"  # ADM's sFID features (see InceptionWithSpatial)
_INCEPTION_SPATIAL_NAME = "dcae15-inception-v3-compat-spatial"  # registry name of InceptionWithSpatial
PYTORCH_FID_INPUT_NAME = "dcae15-inception-v3-pytorch-fid-input"  # InceptionPytorchFidInput: DC-Gen's FID input
INCEPTION_NETWORKS = (INCEPTION_NAME, PYTORCH_FID_INPUT_NAME)  # the same 2015-12-05 weights, two input pipelines


@dataclasses.dataclass(frozen=True)
class FeatureExtractorSpec:
    """A feature network registered with torch-fidelity, plus what every reported number must say about it.

    Attributes:
        name: torch-fidelity registry name (``inception-v3-compat`` or the proxy's registered name).
        label: the value of the ``feature_extractor`` column in results (e.g. ``inception-v3-compat``, ``proxy-<fp>``).
        prefix: prepended to every metric name (``""`` for Inception, ``"proxy-"`` for the proxy).
        fingerprint: hash of the weights (+ config): part of every reference-statistics key.
        weights_path: weight file (path or URL); loaded with ``weights_only=True`` and handed to torch-fidelity as
            ``feature_extractor_weights_path`` (so it never downloads).
        layers: torch-fidelity feature layer per metric family (``fid``, ``isc``, ``prc``, ``kid``; optional
            ``sfid``: the spatial features of ADM's sFID, Inception only).
        info: extra facts reported next to the numbers (e.g. the proxy's held-out accuracy).
    """

    name: str
    label: str
    prefix: str
    fingerprint: str
    weights_path: str
    layers: Mapping[str, str]
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        missing = {"fid", "isc", "prc", "kid"} - set(self.layers)
        if missing:
            raise ValueError(f"FeatureExtractorSpec.layers lacks {sorted(missing)}")
        if self.prefix not in ("", "proxy-"):
            raise ValueError(f"FeatureExtractorSpec.prefix must be '' or 'proxy-', got {self.prefix!r}")

    @property
    def has_sfid(self) -> bool:
        """Whether this network provides ADM's spatial features (sFID)."""
        return "sfid" in self.layers

    def metric_name(self, metric: str) -> str:
        """The reported name of ``metric`` (``fid`` -> ``proxy-fid`` for the proxy)."""
        return f"{self.prefix}{metric}"

    def build(self, layers: Sequence[str], device: str | torch.device = "cpu") -> torch.nn.Module:
        """Instantiate the torch-fidelity extractor for ``layers``; weights are loaded with weights_only=True."""
        name = self.name
        if name == INCEPTION_NAME:  # the same network and weights, plus the sFID features when asked for
            name = _register_inception_spatial()
        elif name == PYTORCH_FID_INPUT_NAME:
            if name not in FEATURE_EXTRACTORS_REGISTRY:
                register_feature_extractor(name, InceptionPytorchFidInput)
        else:
            register_proxy_extractor()
        # torch-fidelity itself unpickles with weights_only=False; load safely here and hand it a clean buffer.
        state = torch.load(io.BytesIO(read_bytes(self.weights_path)), map_location="cpu", weights_only=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        fe = create_feature_extractor(
            name, list(dict.fromkeys(layers)), cuda=False, feature_extractor_weights_path=buf, verbose=False
        )
        return fe.to(device)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()[:16]
    return _FILE_HASHES[key]


def inception_extractor(weights: str | os.PathLike | None = None, *, input: str = "torch-fidelity") -> FeatureExtractorSpec:
    """The standard InceptionV3 (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``), found offline.

    Args:
        weights: explicit file (or folder holding it); else ``$DCAE15_WEIGHTS``, then ``$TORCH_HOME/hub/checkpoints``.
        input: ``torch-fidelity`` (its TF1-style resize to 299 and ``(x - 128) / 128``: the TF graph ADM runs) or
            ``pytorch-fid`` (DC-Gen's FID input, :class:`InceptionPytorchFidInput`: the same weights, another label
            and fingerprint, so its reference statistics are cached apart; no sFID features).

    Raises:
        MissingWeightsError: naming the file and the places searched (nothing is ever downloaded).
        ValueError: an unknown ``input``.
    """
    if input not in ("torch-fidelity", "pytorch-fid"):
        raise ValueError(f"input must be 'torch-fidelity' or 'pytorch-fid', got {input!r}")
    path = find_weights(INCEPTION_WEIGHTS, explicit=weights, what="InceptionV3 for FID/IS/precision/recall (torch-fidelity)")
    if input == "pytorch-fid":
        return FeatureExtractorSpec(
            name=PYTORCH_FID_INPUT_NAME,
            label=f"{INCEPTION_NAME}/pytorch-fid-input",
            prefix="",
            fingerprint=f"{_file_hash(path)}-ptfid",
            weights_path=str(path),
            layers={"fid": "2048", "isc": "logits_unbiased", "prc": "2048", "kid": "2048"},
        )
    return FeatureExtractorSpec(
        name=INCEPTION_NAME,
        label=INCEPTION_NAME,
        prefix="",
        fingerprint=_file_hash(path),
        weights_path=str(path),
        layers={"fid": "2048", "isc": "logits_unbiased", "prc": "2048", "kid": "2048", "sfid": SPATIAL},
    )


class InceptionWithSpatial(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 that also provides ADM's sFID features (``"spatial"``).

    ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) takes ``mixed_6/conv:0`` of the
    TF Inception graph, keeps its first 7 channels (``spatial[..., :7]``) and flattens the NHWC
    ``[N, 17, 17, 7]`` tensor to 2023 numbers per image. In torch-fidelity's port of that graph ``mixed_6`` is
    ``Mixed_6d`` (mixed, mixed_1, mixed_2 = 5b-5d; mixed_3 = 6a; ...) and its ``conv`` is ``branch1x1``
    (conv + BN + ReLU). We flatten in ADM's NHWC order, so mu_s / sigma_s of an ADM reference batch line up.
    """

    def __init__(self, name, features_list, **kwargs):
        wanted = list(features_list)
        inner = [f for f in wanted if f != SPATIAL]
        if SPATIAL in wanted and not set(inner) & {"768", "2048", "logits_unbiased", "logits"}:
            inner.append("768")  # the parent stops early: make it run past Mixed_6d
        super().__init__(name, inner or ["768"], **kwargs)
        self.features_list, self._inner = wanted, inner or ["768"]
        self._spatial: torch.Tensor | None = None
        if SPATIAL in wanted:
            self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, _module, _inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(len(output), -1).to(torch.float32)  # (B, 2023)

    def forward(self, x):
        wanted = self.features_list
        self.features_list = self._inner  # the parent returns the features it knows, in this order
        try:
            out = dict(zip(self._inner, super().forward(x)))
        finally:
            self.features_list = wanted
        if SPATIAL in wanted:
            out[SPATIAL], self._spatial = self._spatial, None
        return tuple(out[f] for f in wanted)

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL)


class InceptionPytorchFidInput(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 fed the way DC-Gen's FID code feeds its pytorch-fid InceptionV3
    (``dc_gen/apps/metrics/fid/fid.py`` ``FIDStats.add_data``): ``x / 255``, ``Normalize(0.5, 0.5)``, then, unless
    already 299 px, ``F.interpolate(..., (299, 299), mode="bilinear", align_corners=False)``.

    Both projects ship the same 2015-12-05 weights file; only the input differs (torch-fidelity resizes like TF1 and
    scales by ``(x - 128) / 128``). The parent's preprocessing still runs; a pre-hook on the first convolution swaps
    its result for DC-Gen's tensor, so every layer after it is torch-fidelity's.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list, **kwargs)
        self._raw: torch.Tensor | None = None
        self.Conv2d_1a_3x3.register_forward_pre_hook(self._dcgen_input)

    def _dcgen_input(self, _module, args):
        x = (self._raw.to(torch.float32) / 255 - 0.5) / 0.5  # (B, 3, H, W) in [-1, 1]
        if list(x.shape[-2:]) != [self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE]:
            x = F.interpolate(x, size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE), mode="bilinear",
                              align_corners=False)  # (B, 3, 299, 299)
        return (x.to(args[0].dtype),)

    def forward(self, x):
        self._raw = x
        try:
            return super().forward(x)
        finally:
            self._raw = None


def _register_inception_spatial() -> str:
    if _INCEPTION_SPATIAL_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_INCEPTION_SPATIAL_NAME, InceptionWithSpatial)
    return _INCEPTION_SPATIAL_NAME



def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ProxyNet(nn.Module):
    """A VGG-style CNN: 3 stages of conv blocks with max-pooling, global average pool, linear classifier."""

    def __init__(self, num_classes: int, width: int = 16, resolution: int = 32):
        super().__init__()
        w = width
        self.resolution = resolution
        self.body = nn.Sequential(
            _block(3, w), _block(w, w), nn.MaxPool2d(2),            # R/2
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),  # R/4
            _block(2 * w, 4 * w), _block(4 * w, 4 * w),
        )
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> float [B,3,R,R] in [-1, 1]."""
        x = x.float() / 127.5 - 1.0
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float [B,3,R,R] in [-1,1] -> (features [B,4w], logits [B,classes])."""
        feats = self.body(x).mean(dim=(2, 3))  # (B, 4w)
        return feats, self.head(feats)


class ProxyFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper: provides ``features`` (FID/PR/KID) and ``logits`` (IS) of a trained ProxyNet."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise MissingWeightsError(
                "the proxy feature extractor needs its trained weights: build it with "
                "dcae15.metrics.proxy.proxy_extractor(dataset_url), which trains and caches the classifier"
            )
        src = feature_extractor_weights_path
        if not hasattr(src, "read"):
            src = io.BytesIO(read_bytes(str(src)))
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        cfg = ckpt["config"]
        self.net = ProxyNet(int(ckpt["num_classes"]), width=int(cfg["width"]), resolution=int(cfg["resolution"]))
        self.net.load_state_dict(ckpt["state_dict"])
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images [B,3,H,W], got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        feats, logits = self.net(self.net.prepare(x))
        out = {"features": feats.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def register_proxy_extractor() -> str:
    """Register ``ProxyFeatureExtractor`` with torch-fidelity under ``PROXY_NAME`` (idempotent); returns the name."""
    if PROXY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(PROXY_NAME, ProxyFeatureExtractor)
    return PROXY_NAME
