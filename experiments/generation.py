"""Table 5 pieces: sample a diffusion checkpoint's EMA weights, decode with the store's AE, score proxy-FID."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["sample_images", "checkpoint_proxy_fid", "proxy_class_accuracy"]


@torch.no_grad()
def sample_images(run_url: str, step: int, *, ae: Any, scaling_factor: float, num_samples: int, seed: int,
                  sampler: str, sample_steps: int, cfg_scale: float = 1.0, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,H,W,3], their class labels [N]) from the EMA weights of checkpoint ``step`` (labels uniform; classifier-free guidance ``cfg_scale``, 1 = none).

    The noise and the labels depend only on ``seed``, so every run is scored on the same noise (common random
    numbers: differences between runs are not sampling noise of the starting points).
    """
    from dcae15.diffusion.checkpoint import checkpoint_url, load_ema_state, read_run_config
    from dcae15.diffusion.objectives import make_objective
    from dcae15.diffusion.samplers import sample_latents
    from dcae15.metrics.fidelity import uniform_labels
    from dcae15.metrics.image_quality import to_uint8
    from dcae15.models.registry import build_model, config_from_dict

    cfg = read_run_config(run_url)
    mcfg = config_from_dict(cfg["model_config"])
    model = build_model(mcfg)
    load_ema_state(checkpoint_url(run_url, step), model)
    model.eval()
    objective = make_objective(cfg["objective"])
    labels = torch.from_numpy(uniform_labels(num_samples, mcfg.num_classes, seed))
    gen = torch.Generator().manual_seed(seed)
    c, (h, w) = mcfg.in_channels, mcfg.input_size
    out = []
    for a in range(0, num_samples, batch_size):
        y = labels[a:a + batch_size]
        lat = sample_latents(model, objective, shape=(len(y), c, h, w), labels=y, sampler=sampler,
                             steps=sample_steps, generator=gen, null_class=mcfg.num_classes,
                             cfg_scale=cfg_scale)
        img = ae.decode(lat.float() / scaling_factor)  # the store fed the model s·z
        out.append(to_uint8(img).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out), labels.numpy()


@torch.no_grad()
def proxy_class_accuracy(images: np.ndarray, labels: np.ndarray, classifier: torch.nn.Module) -> float:
    """Fraction of images the proxy classifier assigns to the class they were generated for: whether the model
    draws the requested object (structure), a check that does not depend on FID's Gaussian fit."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    pred = torch.cat([classifier(classifier.prepare(x[a:a + 500]))[1].argmax(1) for a in range(0, len(x), 500)])
    return float((pred.numpy() == np.asarray(labels)).mean())


def checkpoint_proxy_fid(images: np.ndarray, reference: Any, extractor: Any) -> float:
    """proxy-FID of uint8 images [N,H,W,3] against cached reference statistics."""
    from dcae15.metrics.fidelity import generation_metrics

    return float(generation_metrics(images, reference, extractor=extractor, metrics=("fid",))["proxy-fid"])
