"""Pointers: what a stage returns and caches instead of its data — a small dict naming an artifact (``kind``, URL,
fingerprints, size) read back from the artifact itself.

``describe_<kind>`` reads a pointer from an artifact; :func:`validate` is the one rule for every kind: a cached
pointer still holds when describing its artifact again gives the same values (and, for kinds that can be half
written, ``complete``). Stages import their inputs' describers from here, never from another stage's module.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["describe_dataset", "describe_ae", "describe_store", "describe_run", "describe_samples", "describe_row",
           "describe_recon", "describe_figure", "results_url", "run_url_for", "dataset_of", "validate"]


def describe_dataset(url: str) -> dict[str, Any]:
    """A packed dataset: URL + fingerprint + size (read from the dataset itself)."""
    from storage.shards import open_dataset

    ds = open_dataset(url)
    return {"kind": "dataset", "url": url, "fingerprint": ds.fingerprint,
            "num_samples": ds.num_samples, "num_classes": ds.num_classes}


def describe_ae(url: str) -> dict[str, Any]:
    """A saved autoencoder: URL + fingerprint (hash of weights + config) + latent shape."""
    from dcae15.ae.model import StructuredAutoencoder

    ae = StructuredAutoencoder.from_pretrained(url)
    return {"kind": "autoencoder", "url": url, "fingerprint": ae.fingerprint(),
            "latent_channels": ae.latent_channels, "spatial_compression": ae.spatial_compression}


def describe_store(url: str) -> dict[str, Any]:
    """A latent store: URL + the fingerprints it was written from + its size; complete = finalized, no unit missing."""
    from storage.latent_store import LatentStore

    store = LatentStore.open(url, read_only=True)
    a = store.attrs
    return {"kind": "latent_store", "url": url, "store_id": store.store_id,
            "ae_fingerprint": a["ae_fingerprint"], "dataset_fingerprint": a["dataset_fingerprint"],
            "resolution": int(a["resolution"]), "num_samples": store.num_samples, "complete": store.is_complete and not store.missing_units()}


def describe_run(url: str) -> dict[str, Any]:
    """A diffusion run: URL + the step of its latest checkpoint + that checkpoint's location."""
    from dcae15.diffusion.checkpoint import read_run_config
    from dcae15.diffusion.train import latest_checkpoint

    step, ckpt_url = latest_checkpoint(url)
    return {"kind": "diffusion_run", "url": url, "run_id": read_run_config(url)["run_id"],
            "step": step, "checkpoint": ckpt_url}


def run_url_for(root: str, store_id: str, backbone: str, train: dict[str, Any], seed: int) -> str:
    """Where the run of (backbone, training config, store) lives: ``<root>/runs/diffusion/<run_id>`` (the
    trainer's own ``run_id_for``), known before it has written anything."""
    from dcae15.diffusion.train import DiffusionTrainConfig, run_id_for
    from storage.layout import Root

    cfg = DiffusionTrainConfig.from_dict({**train, "model": backbone, "seed": seed})
    return Root(root).diffusion_run(run_id_for(cfg, store_id))


def dataset_of(store_url: str, root: str) -> str:
    """The packed dataset a latent store was encoded from: ``<root>/data/<dataset_name>``, fingerprint checked."""
    from storage.latent_store import LatentStore
    from storage.layout import Root

    attrs = LatentStore.open(store_url, read_only=True).attrs
    url = Root(root).dataset(attrs["dataset_name"])
    if describe_dataset(url)["fingerprint"] != attrs["dataset_fingerprint"]:
        raise FileNotFoundError(f"{url} is not the dataset store {store_url} was encoded from "
                                f"(fingerprint {attrs['dataset_fingerprint']})")
    return url


def describe_samples(url: str) -> dict[str, Any]:
    """A sample store: URL + what was sampled + size; complete = every unit written."""
    from storage.sample_store import SampleStore

    store = SampleStore.open(url, read_only=True)
    a = store.attrs
    return {"kind": "samples", "url": url, "run_id": a["run_id"], "backbone": a["backbone"],
            "step": int(a["checkpoint_step"]), "store_id": a.get("store_id", ""),
            "ae_fingerprint": a.get("ae_fingerprint", ""),
            "sampler": a["sampler"], "sampling_steps": int(a["steps"]), "cfg_scale": float(a["cfg_scale"]),
            "num_samples": store.num_samples, "complete": not store.missing_units(),
            "sampling": _sampling_columns(a)}


def _sampling_columns(a: dict[str, Any]) -> dict[str, Any]:
    """How the samples were drawn, as the results table's scalar context columns (``labels``, ``classes``,
    ``guidance_interval``, ``seed``, ``shift``: the flow samplers' timestep shift, 1 when the store records none)."""
    classes = a.get("classes")
    return {"labels": str(a.get("labels", "uniform")), "classes": "all" if classes is None else ",".join(map(str, classes)),
            "guidance_interval": ",".join(str(float(v)) for v in a.get("guidance_interval", (0.0, 1.0))),
            "seed": int(a.get("seed", 0)), "shift": float(a.get("shift", 1.0))}


def results_url(root: str) -> str:
    """The results table under a root."""
    from storage.layout import Root

    return Root(root).results()


def describe_row(root: str, key: dict[str, Any]) -> dict[str, Any]:
    """One scoring in the results table (``key``: run, step, samples, feature extractor); complete = the row is there."""
    from dcae15.metrics.results import has_result

    return {"kind": "result_row", "root": root, "key": key, "complete": has_result(results_url(root), **key)}


def describe_recon(url: str, ae_fingerprint: str) -> dict[str, Any]:
    """The autoencoder's reconstruction scores; complete = ``recon.parquet`` is written."""
    from storage.urls import exists, join

    return {"kind": "recon_eval", "url": url, "ae_fingerprint": ae_fingerprint,
            "complete": exists(join(url, "recon.parquet"))}


def describe_figure(url: str) -> dict[str, Any]:
    """A figure (PNG); complete = the file is there."""
    from storage.urls import exists

    return {"kind": "figure", "url": url, "complete": exists(url)}


_DESCRIBE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "dataset": lambda p: describe_dataset(p["url"]),
    "autoencoder": lambda p: describe_ae(p["url"]),
    "latent_store": lambda p: describe_store(p["url"]),
    "diffusion_run": lambda p: describe_run(p["url"]),
    "samples": lambda p: describe_samples(p["url"]),
    "result_row": lambda p: describe_row(p["root"], p["key"]),
    "recon_eval": lambda p: describe_recon(p["url"], p["ae_fingerprint"]),
    "figure": lambda p: describe_figure(p["url"]),
}


def validate(pointer: dict[str, Any]) -> str | None:
    """None if the artifact a pointer names is still there, complete, and described by the same values; else what
    is wrong (a cached stage result is then recomputed). Extra keys of the pointer (a stage's own notes, e.g. the
    AE's ``phases``) are not compared."""
    kind = pointer.get("kind")
    if kind not in _DESCRIBE:
        return f"unknown pointer kind {kind!r}; known: {', '.join(_DESCRIBE)}"
    where = pointer.get("url") or pointer.get("root")
    try:
        now = _DESCRIBE[kind](pointer)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable artifact means "recompute"
        return f"cannot open {where}: {exc}"
    if now.get("complete") is False:
        return f"{kind} at {where} is incomplete"
    changed = sorted(k for k, v in now.items() if k != "complete" and pointer.get(k) != v)
    if changed:
        return f"{kind} at {where} changed: " + ", ".join(f"{k} {pointer.get(k)!r} -> {now[k]!r}" for k in changed)
    return None
