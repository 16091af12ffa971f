"""Flow-run names that say what a run is (``train DiT-XL on 3f2a…``, not ``hallowed-bullfinch``).

Each function is a flow's ``flow_run_name``: Prefect calls it with no arguments when the run starts, and it reads
the run's parameters from ``prefect.runtime``. A name must never fail a run, so any error gives the flow's name.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

__all__ = ["pipeline_name", "prepare_name", "autoencoder_name", "evaluate_autoencoder_name", "encode_name",
           "train_name", "train_backbones_name", "sample_name", "evaluate_name", "evaluate_checkpoint_name", "sweep_name"]


def _params() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters or {})


def _base(url: Any) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def _parent(url: Any) -> str:
    """``.../runs/ae/<id>/model`` -> ``<id>``: the run a saved model belongs to."""
    parts = str(url).rstrip("/").rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 and parts[-1] == "model" else parts[-1]


def _config_label(config: Any) -> str:
    if isinstance(config, str):
        return _base(config).removesuffix(".yaml").removesuffix(".yml")
    return "custom config" if config else "default config"


def _config(p: dict[str, Any]) -> Any:
    from flows.common import stage_config

    return stage_config(p.get("root"), p.get("config", "demo"))


def _named(fallback: str) -> Callable[[Callable[[dict[str, Any]], str]], Callable[[], str]]:
    def wrap(fn: Callable[[dict[str, Any]], str]) -> Callable[[], str]:
        @functools.wraps(fn)
        def name() -> str:
            try:
                return fn(_params())[:200]
            except Exception:  # noqa: BLE001 - a bad parameter fails in the flow itself, with its real message
                return fallback
        return name
    return wrap


@_named("run_pipeline")
def pipeline_name(p: dict[str, Any]) -> str:
    cfg = _config(p)
    backbones = p.get("backbones") or cfg.diffusion.backbones
    return f"pipeline {_config_label(p.get('config'))}: {', '.join(backbones)} under {cfg.root}"


@_named("prepare_images")
def prepare_name(p: dict[str, Any]) -> str:
    return f"prepare {_config(p).data.name} images"


@_named("train_autoencoder")
def autoencoder_name(p: dict[str, Any]) -> str:
    return f"train AE {_config(p).autoencoder.preset} on {_base(p['dataset'])}"


@_named("evaluate_autoencoder")
def evaluate_autoencoder_name(p: dict[str, Any]) -> str:
    return f"evaluate AE {_parent(p['ae'])} on {_base(p['dataset'])}"


@_named("encode_latents")
def encode_name(p: dict[str, Any]) -> str:
    return f"encode {_base(p['dataset'])} with AE {_parent(p['ae'])}"


@_named("train_diffusion")
def train_name(p: dict[str, Any]) -> str:
    return f"train {p['backbone']} on {_base(p['store'])}"


@_named("train_backbones")
def train_backbones_name(p: dict[str, Any]) -> str:
    d = _config(p).diffusion
    return f"train {', '.join(d.backbones)} on {_base(p['store'])} (concurrency {d.concurrency or 'auto'})"


@_named("sample_run")
def sample_name(p: dict[str, Any]) -> str:
    at = "latest" if p.get("checkpoint") is None else f"step {int(p['checkpoint'])}"
    return f"sample {_base(p['run'])} at {at}"


@_named("evaluate_samples")
def evaluate_name(p: dict[str, Any]) -> str:
    return f"evaluate samples {_base(p['samples'])}"


@_named("evaluate_checkpoint")
def evaluate_checkpoint_name(p: dict[str, Any]) -> str:
    return f"evaluate {_base(p['run'])} at step {int(p['step'])}"


@_named("evaluate_new_checkpoints")
def sweep_name(p: dict[str, Any]) -> str:
    return f"evaluate new checkpoints under {_config(p).root}"
