"""A proxy feature network for the demo: a small CNN classifier trained on the demo data, plugged into torch-fidelity.

The standard Inception weights cannot be downloaded on a fresh machine, so the demo trains this classifier on its
own dataset (seconds on CPU), caches it keyed by (dataset fingerprint, config), reports its held-out accuracy, and
registers it with torch-fidelity as a custom feature extractor: pooled features for FID / precision / recall / KID,
logits for IS. Every number it produces is named ``proxy-fid``, ``proxy-is``, ... and carries the extractor label
``proxy-<key>``: proxy numbers are comparable only with proxy numbers from the same classifier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dcae15.metrics import _io
from dcae15.metrics.extractor import (
    PROXY_NAME,
    FeatureExtractorSpec,
    ProxyFeatureExtractor,
    ProxyNet,
    register_proxy_extractor,
)
from dcae15.metrics.inputs import dataset_fingerprint, default_cache_url, detect_kind, load_labelled_images
from storage.fingerprint import fingerprint
from storage.lease import claim

__all__ = [
    "ProxyConfig",
    "class_accuracy",
    "proxy_is_cached",
    "gaussian_blur",
    "held_out_split",
    "load_proxy_net",
    "proxy_extractor",
    "train_proxy",
]


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """The proxy classifier and its training (every field is part of the cache key).

    Attributes:
        resolution: the classifier's input size; any input is resized to it (antialiased bilinear).
        width: channels of the first stage (then 2x, 4x); the feature vector has 4*width dims.
        epochs: passes over the training split.
        batch_size: training batch size.
        lr: AdamW learning rate (one-cycle schedule).
        weight_decay: AdamW weight decay.
        holdout: fraction of each class held out to measure accuracy.
        seed: seed of the split, the initialisation and the batch order.
        blur: training augmentation: half of each batch is Gaussian-blurred with sigma ~ U(0, blur) pixels (at
            ``resolution``); 0 = off. Without it the classifier scores 0.99 on real images but 0.39 on the same
            images blurred with sigma = 1 px, so its numbers would measure blur rather than shape.
        noise: training augmentation: Gaussian noise with std ~ U(0, noise) (in [-1, 1] units) on every image,
            standing in for an autoencoder's artefacts; 0 = off.
        rotate: training augmentation: random 90-degree rotations (shapes drawn at any angle). False for data
            with a canonical orientation (Fashion-MNIST), where rotations only cost accuracy. With ``blur=0,
            noise=0, rotate=False`` the classifier is an independent judge that sees detail (issue 32).
    """

    resolution: int = 32
    width: int = 16
    epochs: int = 15
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 5e-4
    holdout: float = 0.2
    seed: int = 0
    blur: float = 1.5
    noise: float = 0.1
    rotate: bool = True

    def __post_init__(self):
        if self.resolution < 8 or self.width < 4 or self.epochs < 1 or self.batch_size < 2:
            raise ValueError(
                f"ProxyConfig: need resolution >= 8, width >= 4, epochs >= 1, batch_size >= 2; got {self}"
            )
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"ProxyConfig.holdout must be in (0, 1), got {self.holdout}")
        if self.blur < 0 or self.noise < 0:
            raise ValueError(f"ProxyConfig.blur and noise must be >= 0, got {self.blur}, {self.noise}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"ProxyConfig.lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


def _split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``holdout`` of each class (at least one image) is held out."""
    rng = np.random.default_rng([seed, 7])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(holdout * len(idx))))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.concatenate(train), np.concatenate(test)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur float images [B,C,H,W] with a Gaussian of ``sigma`` pixels (reflect padding); sigma <= 0: unchanged."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # columns


def _augment(xb: torch.Tensor, cfg: ProxyConfig, gen: torch.Generator) -> torch.Tensor:
    """Flip, 90-degree rotation (``cfg.rotate``), blur on half the batch, noise: shape must survive what the AE does to images."""
    if torch.rand((), generator=gen) < 0.5:
        xb = xb.flip(-1)
    if cfg.rotate:
        xb = torch.rot90(xb, int(torch.randint(4, (), generator=gen)), dims=(-2, -1))
    if cfg.blur > 0:
        sigma = float(torch.rand((), generator=gen)) * cfg.blur
        pick = (torch.rand(len(xb), generator=gen) < 0.5).view(-1, 1, 1, 1)
        xb = torch.where(pick, gaussian_blur(xb, sigma), xb)
    if cfg.noise > 0:
        std = torch.rand(len(xb), 1, 1, 1, generator=gen) * cfg.noise
        xb = xb + std * torch.randn(xb.shape, generator=gen)
    return xb


@torch.no_grad()
def _predict(net: ProxyNet, images: torch.Tensor, batch: int = 256, blur: float = 0.0) -> torch.Tensor:
    """Predicted classes of uint8 images [N,3,H,W] (optionally blurred with ``blur`` px at the net's resolution)."""
    net.eval()
    out = [net(gaussian_blur(net.prepare(images[i:i + batch]), blur))[1].argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _accuracy(net: ProxyNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 256, blur: float = 0.0) -> float:
    return float((_predict(net, images, batch, blur) == labels).float().mean())


def train_proxy(
    images: np.ndarray, labels: np.ndarray, cfg: ProxyConfig = ProxyConfig(), *, verbose: bool = False
) -> tuple[ProxyNet, dict]:
    """Train a ProxyNet on uint8 images [N,H,W,3] with int labels; returns (net, info with held-out accuracy).

    Augmentation: horizontal flips and 90-degree rotations (the shapes are drawn at random angles), which keeps
    the classifier blind to orientation so its features describe shape, colour and texture; blur and noise
    (``cfg.blur``, ``cfg.noise``), so that an autoencoder's softened reconstructions are still recognised. The info
    reports held-out accuracy on real images and on the same images blurred with sigma = 1 px.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    if len(images) != len(labels) or len(np.unique(labels)) < 2:
        raise ValueError(f"need images and labels of equal length with >= 2 classes, got {len(images)} / {len(labels)}")
    torch.manual_seed(cfg.seed)
    tr, te = _split(labels, cfg.holdout, cfg.seed)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # uint8 [N,3,H,W]
    y = torch.from_numpy(labels)
    net = ProxyNet(num_classes, width=cfg.width, resolution=cfg.resolution)
    # resize once: the training set is small and every epoch would redo the same interpolation
    xs_tr = torch.cat([net.prepare(x[tr[i:i + 512]]) for i in range(0, len(tr), 512)])
    ys_tr = y[tr]
    steps_per_epoch = max(1, len(tr) // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), desc="proxy classifier", disable=not verbose):
        net.train()
        order = torch.randperm(len(tr), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb, yb = _augment(xs_tr[idx], cfg, gen), ys_tr[idx]
            loss = F.cross_entropy(net(xb)[1], yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - t0
    net.eval()
    info = {
        "held_out_accuracy": _accuracy(net, x[te], y[te]),
        "held_out_accuracy_blur1px": _accuracy(net, x[te], y[te], blur=1.0),
        "train_accuracy": _accuracy(net, x[tr], y[tr]),
        "num_train": int(len(tr)), "num_held_out": int(len(te)), "num_classes": num_classes,
        "train_seconds": round(train_seconds, 2), "torch_threads": torch.get_num_threads(),
    }
    return net, info


def proxy_extractor(
    dataset_url: str,
    cfg: ProxyConfig = ProxyConfig(),
    *,
    cache_url: str | None = None,
    storage_options: dict | None = None,
    verbose: bool = False,
) -> FeatureExtractorSpec:
    """The proxy extractor for a dataset: loaded from its cache, or trained (and cached) on first use.

    The cache is ``<cache>/proxy/<dataset fingerprint>-<config hash>/`` holding ``model.pt`` (config, class count,
    state_dict: loadable with ``weights_only=True``) and ``info.json`` (held-out accuracy etc.), written last.

    Args:
        dataset_url: the demo dataset (class-folder tree or packed dataset).
        cfg: classifier and training settings.
        cache_url: where to cache; default next to the data (``<dataset>/eval`` or ``<folder>.eval``).

    Returns:
        A spec whose metric names are ``proxy-…`` and whose ``info`` holds the held-out accuracy.
    """
    register_proxy_extractor()
    dataset_fp, key, url = _cache_entry(dataset_url, cfg, cache_url, storage_options)
    model_url, info_url = _io.join(url, "model.pt"), _io.join(url, "info.json")
    if not _io.exists(info_url, storage_options):
        # one trainer per cache entry: a second evaluation waits here, then loads the weights the first wrote
        with claim(url, what="proxy classifier", storage_options=storage_options):
            if not _io.exists(info_url, storage_options):
                _train_and_cache(dataset_url, cfg, key, dataset_fp, model_url, info_url, storage_options, verbose)
    info = _io.read_json(info_url, storage_options)
    return FeatureExtractorSpec(
        name=PROXY_NAME,
        label=f"proxy-{key}",
        prefix="proxy-",
        fingerprint=info["weights_sha256"],
        weights_path=model_url,
        layers={"fid": "features", "isc": "logits", "prc": "features", "kid": "features"},
        info={k: info[k] for k in ("held_out_accuracy", "held_out_accuracy_blur1px", "num_held_out", "num_classes",
                                   "train_seconds") if k in info},
    )


def _cache_entry(dataset_url: str, cfg: ProxyConfig, cache_url: str | None,
                 storage_options: dict | None) -> tuple[str, str, str]:
    """(dataset fingerprint, cache key, cache entry URL) of the proxy classifier of ``cfg`` on a dataset."""
    dataset_fp = dataset_fingerprint(dataset_url, storage_options)
    key = f"{dataset_fp[:12]}-{fingerprint(_key_fields(cfg), length=8)}"
    return dataset_fp, key, _io.join(cache_url or default_cache_url(dataset_url, storage_options), "proxy", key)


def _key_fields(cfg: ProxyConfig) -> dict:
    """The config as the cache key sees it: fields added later are left out at their default, so every classifier
    cached before they existed keeps its key (and its ``proxy-<key>`` label)."""
    d = dataclasses.asdict(cfg)
    if d["rotate"]:
        del d["rotate"]
    return d


def proxy_is_cached(dataset_url: str, cfg: ProxyConfig = ProxyConfig(), *, cache_url: str | None = None,
                    storage_options: dict | None = None) -> bool:
    """Whether the proxy classifier of ``cfg`` on this dataset is complete in its cache (``proxy_extractor`` would
    only load it)."""
    url = _cache_entry(dataset_url, cfg, cache_url, storage_options)[2]
    return _io.exists(_io.join(url, "info.json"), storage_options)


def _train_and_cache(dataset_url: str, cfg: ProxyConfig, key: str, dataset_fp: str, model_url: str, info_url: str,
                     storage_options: dict | None, verbose: bool) -> None:
    """Train the proxy classifier and write ``model.pt``, then ``info.json`` (the completion marker)."""
    resolution = None if _is_folder(dataset_url, storage_options) else cfg.resolution
    images, labels, class_names = load_labelled_images(dataset_url, resolution=resolution,
                                                      storage_options=storage_options)
    net, info = train_proxy(images, labels, cfg, verbose=verbose)
    buf = io.BytesIO()
    torch.save({"config": dataclasses.asdict(cfg), "num_classes": info["num_classes"],
                "state_dict": net.state_dict()}, buf)
    _io.write_atomic(model_url, buf.getvalue(), storage_options)
    info.update(dataset_url=str(dataset_url), dataset_fingerprint=dataset_fp, config=dataclasses.asdict(cfg),
                class_names=list(class_names), weights_sha256=_bytes_hash(buf.getvalue()))
    _io.write_json_atomic(info_url, info, storage_options)  # completion marker, last
    if verbose:
        print(f"proxy classifier {key}: held-out accuracy {info['held_out_accuracy']:.3f} "
              f"({info['held_out_accuracy_blur1px']:.3f} blurred 1 px; {info['num_held_out']} images), "
              f"trained in {info['train_seconds']:.1f} s")


def held_out_split(labels: np.ndarray, cfg: ProxyConfig = ProxyConfig()) -> np.ndarray:
    """Indices of the images the proxy classifier of ``cfg`` never trained on (its held-out split)."""
    return _split(np.asarray(labels, dtype=np.int64), cfg.holdout, cfg.seed)[1]


def load_proxy_net(spec: FeatureExtractorSpec) -> ProxyNet:
    """The trained classifier behind a proxy extractor spec (eval mode, CPU)."""
    if spec.prefix != "proxy-":
        raise ValueError(f"{spec.label!r} is not a proxy extractor; class accuracy needs the proxy classifier")
    return ProxyFeatureExtractor(spec.name, ("logits",), feature_extractor_weights_path=spec.weights_path).net


def class_accuracy(spec: FeatureExtractorSpec, images: np.ndarray, labels: np.ndarray, *,
                   net: ProxyNet | None = None) -> float:
    """Fraction of uint8 images [N,H,W,3] that the proxy classifier assigns to their ``labels`` — for samples,
    the class they were generated for: whether class-conditional samples show their class's shape."""
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels) or not len(images):
        raise ValueError(f"need uint8 images [N,H,W,3] with N >= 1 labels, got {images.shape}, {labels.shape}")
    net = net or load_proxy_net(spec)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return _accuracy(net, x, torch.from_numpy(labels))


def _is_folder(url: str, storage_options: dict | None) -> bool:
    return detect_kind(url, storage_options) == "folder"


def _bytes_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
