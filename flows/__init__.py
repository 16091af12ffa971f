"""Prefect flows over storage/ and dcae15/: one flow per stage and a pipeline; `dcae15` CLI in flows.cli.

Flows are imported lazily so that ``flows.cli`` can set Prefect's environment before Prefect is imported. Import
flows from their modules (``from flows.sample import sample``): once a submodule such as ``flows.sample`` is loaded,
the package attribute of that name is the module, not the flow.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "prepare_images",
    "train_autoencoder",
    "encode_latents",
    "train_diffusion",
    "sample",
    "evaluate",
    "evaluate_new_checkpoints",
    "evaluate_checkpoint",
    "pipeline",
]

_HOME = {
    "prepare_images": "flows.prepare",
    "train_autoencoder": "flows.autoencoder",
    "encode_latents": "flows.encode",
    "train_diffusion": "flows.diffusion",
    "sample": "flows.sample",
    "evaluate": "flows.evaluate",
    "evaluate_new_checkpoints": "flows.evaluate",
    "evaluate_checkpoint": "flows.evaluate_checkpoint",
    "pipeline": "flows.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
