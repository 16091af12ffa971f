"""Does the autoencoder keep the class? The proxy classifier on real vs reconstructed held-out images, and the
proxy-FID of those reconstructions: the floor a diffusion model's samples (decoded by this AE) cannot go below."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dcae15.ae.model import StructuredAutoencoder
from dcae15.metrics.extractor import FeatureExtractorSpec
from dcae15.metrics.fidelity import generation_metrics
from dcae15.metrics.inputs import load_labelled_images
from dcae15.metrics.proxy import ProxyConfig, class_accuracy, held_out_split, load_proxy_net
from dcae15.pixels import from_uint8_nhwc, to_uint8_nhwc

__all__ = ["reconstruction_class_check"]


@torch.no_grad()
def reconstruction_class_check(ae_url: str, dataset_url: str, spec: FeatureExtractorSpec, reference: Any, *,
                               resolution: int, proxy_cfg: ProxyConfig = ProxyConfig(), batch_size: int = 64,
                               storage_options: dict | None = None) -> dict[str, Any]:
    """Reconstruct the proxy classifier's held-out images (images it never trained on) with the AE at all c
    channels and score them.

    Args:
        reference: the dataset's reference statistics for ``spec`` (``dcae15.metrics.reference.get_reference``).

    Returns:
        ``num_images``; ``proxy-class_accuracy_real`` / ``proxy-class_accuracy_recon`` (the classifier on the
        held-out images and on their reconstructions) and their ratio ``recon_over_real``; ``proxy-fid_recon``
        (the floor for samples decoded by this AE) and ``proxy-fid_real`` (real held-out images: the floor of a
        perfect model at this sample count).
    """
    images, labels, _ = load_labelled_images(dataset_url, resolution=resolution, storage_options=storage_options)
    idx = held_out_split(labels, proxy_cfg)
    images, labels = images[idx], labels[idx]
    ae = StructuredAutoencoder.from_pretrained(ae_url, storage_options=storage_options).eval()
    recon = []
    for i in range(0, len(images), batch_size):
        x = from_uint8_nhwc(images[i:i + batch_size])
        y = ae.decode(ae.encode(x))
        recon.append(to_uint8_nhwc(y))
    recon = np.concatenate(recon)
    net = load_proxy_net(spec)
    real_acc = class_accuracy(spec, images, labels, net=net)
    recon_acc = class_accuracy(spec, recon, labels, net=net)
    fid = lambda imgs: generation_metrics(imgs, reference, extractor=spec, metrics=("fid",))[spec.metric_name("fid")]  # noqa: E731
    return {"num_images": int(len(images)), "proxy-class_accuracy_real": real_acc,
            "proxy-class_accuracy_recon": recon_acc, "recon_over_real": recon_acc / max(real_acc, 1e-9),
            "proxy-fid_recon": fid(recon), "proxy-fid_real": fid(images)}
