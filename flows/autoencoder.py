"""Stage 2: the structured autoencoder — train a preset on the packed images (resumable), or take a pretrained one."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task

from flows import names
from flows.artifacts import publish_pointer
from flows.caching import STAGE_CACHE, run_cached
from flows.common import ConfigArg, stage_config
from flows.prepare import describe_dataset

__all__ = ["describe_ae", "validate_ae", "fit_autoencoder", "train_autoencoder"]


def describe_ae(url: str) -> dict[str, Any]:
    """The pointer of a saved autoencoder: URL + fingerprint (hash of weights + config) + latent shape."""
    from dcae15.autoencoder import StructuredAutoencoder

    ae = StructuredAutoencoder.from_pretrained(url)
    return {"kind": "autoencoder", "url": url, "fingerprint": ae.fingerprint(),
            "latent_channels": ae.latent_channels, "spatial_compression": ae.spatial_compression}


def validate_ae(pointer: dict[str, Any]) -> str | None:
    """None if the saved autoencoder loads and has the recorded fingerprint; else what is wrong."""
    try:
        now = describe_ae(pointer["url"])
    except Exception as exc:  # noqa: BLE001 - unreadable or missing weights mean "recompute"
        return f"cannot load {pointer['url']}: {exc}"
    return None if now["fingerprint"] == pointer["fingerprint"] else f"fingerprint {now['fingerprint']} != {pointer['fingerprint']}"


@task(cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def fit_autoencoder(root: str, dataset: dict[str, Any], ae: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train (or resume) the autoencoder run for (config, dataset); returns a pointer to the saved model."""
    from dcae15.ae_train import AETrainConfig, train_autoencoder as train
    from storage.fingerprint import fingerprint, short_id
    from storage.urls import join

    cfg = AETrainConfig(**{"preset": ae["preset"], "seed": seed, **ae["train"]})
    run_url = join(root, "runs", "ae", short_id(fingerprint(cfg), dataset["fingerprint"]))
    get_run_logger().info("training autoencoder %s on %s -> %s", ae["preset"], dataset["url"], run_url)
    summary = train(cfg, dataset["url"], run_url)
    return describe_ae(summary["model_url"])


@flow(name="train_autoencoder", flow_run_name=names.autoencoder_name)
def train_autoencoder(dataset: str, root: str | None = None, config: ConfigArg = "demo") -> dict[str, Any]:
    """Train the config's autoencoder preset on the packed dataset at ``dataset`` (or load ``pretrained``)."""
    cfg = stage_config(root, config)
    if cfg.autoencoder.pretrained:
        return describe_ae(cfg.autoencoder.pretrained)
    return publish_pointer("autoencoder", run_cached(fit_autoencoder, validate_ae, root=cfg.root, dataset=describe_dataset(dataset),
                      ae=dataclasses.asdict(cfg.autoencoder), seed=cfg.seed))
