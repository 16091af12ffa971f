"""Export a diffusion run's weights (EMA by default) as one safetensors file that describes itself.

The file holds the backbone's state dict (buffers included) and, in the safetensors metadata, the model config and
everything needed to use it: run id, backbone, checkpoint step, which weights, the latent normalisation and the
autoencoder fingerprint the latents came from. ``load_exported`` rebuilds the model from the file alone; a
``<file>.json`` next to it repeats the metadata for people and tools that do not read safetensors headers.
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["FORMAT", "export_weights", "load_exported"]

FORMAT = "dcae15-diffusion-weights-v1"


def export_weights(run_url: str, out_url: str, *, checkpoint: int | str | None = None, ema: bool = True,
                   storage_options: dict | None = None) -> dict[str, Any]:
    """Write ``out_url`` (``.safetensors``) + ``out_url.json`` with a run's EMA (or raw) weights.

    Returns:
        The metadata written (``format``, ``run_id``, ``backbone``, ``step``, ``weights``, ``model_config`` ...).
    """
    from safetensors.torch import save

    from dcae15.diffusion.sample import load_run_model
    from storage.urls import write_atomic

    if not str(out_url).endswith(".safetensors"):
        raise ValueError(f"export writes a .safetensors file, got {out_url!r}")
    model, conf, step = load_run_model(run_url, checkpoint=checkpoint, ema=ema, storage_options=storage_options)
    meta = {"format": FORMAT, "run_id": conf["run_id"], "backbone": conf["train"]["model"], "step": int(step),
            "weights": "ema" if ema else "model", "model_config": conf["model_config"],
            "objective": conf.get("objective"), "latent_norm": conf.get("latent_norm"),
            "ae_fingerprint": conf.get("ae_fingerprint"), "ae_url": conf.get("ae_url"),
            "store_id": conf.get("store_id"), "run_url": str(run_url)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"dcae15": json.dumps(meta, default=str)})
    write_atomic(out_url, blob, storage_options)
    write_atomic(f"{out_url}.json", json.dumps(meta, indent=1, default=str).encode(), storage_options)
    return meta


def load_exported(url: str, *, storage_options: dict | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a file ``export_weights`` wrote.

    Raises:
        ValueError: the file is not such an export (no ``dcae15`` metadata of this format).
    """
    from safetensors.torch import load

    from dcae15.models.registry import build_model, config_from_dict
    from storage.urls import read_bytes

    blob = read_bytes(url, storage_options)
    tensors = load(blob)
    n = int.from_bytes(blob[:8], "little")  # safetensors: u64 header length, then the JSON header
    raw = json.loads(blob[8:8 + n]).get("__metadata__", {}).get("dcae15")
    if raw is None or json.loads(raw).get("format") != FORMAT:
        raise ValueError(f"{url} is not a dcae15 weights export ({FORMAT}): no 'dcae15' metadata")
    meta = json.loads(raw)
    model = build_model(config_from_dict(meta["model_config"]))
    model.load_state_dict(tensors)
    return model.eval(), meta
