"""Figure 3 / Table 1 pieces: a decoder-only fine-tune at a fixed c', a proxy perceptual distance, and evaluation."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["finetune_decoder", "ProxyPerceptual", "proxy_lpips", "reconstruct_grid"]


def finetune_decoder(ae_url: str, dataset: Any, out_url: str, *, channels: int, steps: int, batch_size: int,
                     lr: float, resolution: int, seed: int) -> dict:
    """Fine-tune only the decoder of a saved AE to reconstruct from its first ``channels`` latent channels.

    The library's ``decoder_finetune`` phase (``dcae15.ae.train``): encoder frozen, so the latent (what the
    diffusion model will see) is unchanged; this only reveals how much of the image the first c' channels hold.
    Here with loss L1 only (no LPIPS weights on this machine), AdamW without weight decay, batches as pure
    functions of (seed, step); the run is resumable and a finished one is returned as is.

    Returns:
        ``{"model_url", "channels", "steps", "seconds", "final_l1"}``.
    """
    from dcae15.ae.train import AETrainConfig, train_autoencoder

    cfg = AETrainConfig(phase="decoder_finetune", init_from=ae_url, finetune_channels=channels, steps=steps,
                        batch_size=batch_size, lr=lr, weight_decay=0.0, resolution=resolution, seed=seed + 7919,
                        perceptual="none", w_lpips=0.0, grad_clip=1.0, hflip=True, device="cpu",
                        checkpoint_every=max(1, steps), log_every=max(1, steps), progress=False)
    ptr = train_autoencoder(cfg, dataset.url, out_url, dataset=dataset)
    if "phase" not in ptr:  # a fine-tune finished by the older copy of this function: its own pointer
        return ptr
    return {"model_url": ptr["model_url"], "channels": int(channels), "steps": int(ptr["steps"]),
            "seconds": ptr.get("seconds"), "final_l1": ptr.get("loss")}


class ProxyPerceptual(nn.Module):
    """LPIPS-style distance in the proxy classifier's feature space (the un-learned "lin=False" LPIPS form).

    Activations after each conv block are unit-normalised over channels; the squared difference is averaged over
    positions and then over blocks. The real LPIPS needs ImageNet-trained torchvision weights that cannot be
    downloaded here, and LPIPS on a random backbone is meaningless; this proxy is trained on the same data as
    the proxy-FID network, so its numbers are comparable only with each other (labelled ``proxy-lpips``).
    """

    def __init__(self, spec: Any) -> None:
        super().__init__()
        from dcae15.metrics.proxy import ProxyNet
        from storage.urls import read_bytes

        ckpt = torch.load(io.BytesIO(read_bytes(str(spec.weights_path))), map_location="cpu", weights_only=True)
        cfg = ckpt["config"]
        self.net = ProxyNet(int(ckpt["num_classes"]), width=int(cfg["width"]), resolution=int(cfg["resolution"]))
        self.net.load_state_dict(ckpt["state_dict"])
        self.requires_grad_(False)
        self.eval()

    def _feats(self, x_u8: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.net.prepare(x_u8), []
        for m in self.net.body:
            h = m(h)
            if isinstance(m, nn.Sequential):  # one conv block (conv, BN, ReLU)
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, x_u8: torch.Tensor, y_u8: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,H,W] x2 -> distance per image [B]."""
        fx, fy = self._feats(x_u8), self._feats(y_u8)
        return torch.stack([(a - b).square().sum(1).mean((1, 2)) for a, b in zip(fx, fy)]).mean(0)


@torch.no_grad()
def proxy_lpips(ae_url: str, dataset: Any, perceptual: ProxyPerceptual, *, channels: int, num_images: int,
                resolution: int, batch_size: int = 128) -> float:
    """Mean proxy-LPIPS of reconstructions from the first ``channels`` channels over the first valid images."""
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.metrics.image_quality import to_uint8

    ae = StructuredAutoencoder.from_pretrained(ae_url).eval()
    total, count, start = 0.0, 0, 0
    while count < num_images and start < dataset.num_samples:
        stop = min(start + batch_size, dataset.num_samples)
        images, _, valid = dataset.read_range(start, stop, resolution)
        start = stop
        images = images[np.asarray(valid, bool)][: num_images - count]
        if not len(images):
            continue
        x_u8 = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        y = ae.decode(ae.encode(x_u8.float().div(127.5).sub(1.0)), channels=channels)
        total += float(perceptual(x_u8, to_uint8(y)).sum())
        count += len(images)
    return total / max(count, 1)


@torch.no_grad()
def reconstruct_grid(ae_url: str, images: np.ndarray, channels: int) -> np.ndarray:
    """Reconstructions (uint8 [n,H,W,3]) of ``images`` (uint8 [n,H,W,3]) from the first ``channels`` channels."""
    from dcae15.ae.model import StructuredAutoencoder
    from dcae15.metrics.image_quality import to_uint8

    ae = StructuredAutoencoder.from_pretrained(ae_url).eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return to_uint8(ae.decode(ae.encode(x), channels=channels)).permute(0, 2, 3, 1).numpy()
