"""Where every artifact of a pipeline root lives: the only module that spells the root's folder names.

::

    <root>/data/<dataset name>/            packed image dataset (shards + index)
    <root>/runs/ae/<run id>/               autoencoder run (storage.rundir.RunDir; the saved AE in model/)
    <root>/latents/<store id>/             Zarr latent store
    <root>/runs/diffusion/<run id>/        diffusion run (storage.rundir.RunDir; DCP checkpoints)
    <root>/samples/<sample id>/            Zarr sample store
    <root>/eval/results/                   results table (parquet parts)
    <root>/eval/figures/<name>.png         per-run figures; results plots directly under eval/
    <root>/eval/ae/<ae fingerprint>/       reconstruction metrics and figures of an autoencoder
    <root>/raw/<dataset name>/             the generated demo images before packing
    <root>/prefect-results/                Prefect's persisted task results (default of ``--results``)
    <root>/.dcae15/reruns/<key>.json       stage pointers of a finished command (the cached rerun without Prefect)

Ids are computed by their owners (``storage.latent_store.store_id``, ``dcae15.diffusion.train.run_id_for``,
``dcae15.ae.recipe.chain_fingerprints``); this module only places them. Every address is a URL string under
``Root.url`` (any fsspec URL; ``local://`` and ``file://`` are plain local paths, see ``storage.urls``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .urls import glob as _glob, join, url_to_fs

__all__ = ["Root", "AE_MODEL"]

_DATA, _LATENTS, _SAMPLES, _EVAL = "data", "latents", "samples", "eval"
_AE_RUNS, _DIFFUSION_RUNS = ("runs", "ae"), ("runs", "diffusion")
#: the saved autoencoder inside an AE run directory
AE_MODEL = "model"


@dataclass(frozen=True)
class Root:
    """Typed addresses under one pipeline root URL."""

    url: str

    # -- one artifact each
    def dataset(self, name: str) -> str:
        return join(self.url, _DATA, _name(name, "dataset name"))

    def ae_run(self, run_id: str) -> str:
        return join(self.url, *_AE_RUNS, _name(run_id, "AE run id"))

    def ae_model(self, run_id: str) -> str:
        """The saved autoencoder of an AE run (``StructuredAutoencoder.save_pretrained``)."""
        return join(self.ae_run(run_id), AE_MODEL)

    def latent_store(self, store_id: str) -> str:
        return join(self.url, _LATENTS, _name(store_id, "store id"))

    def diffusion_run(self, run_id: str) -> str:
        return join(self.url, *_DIFFUSION_RUNS, _name(run_id, "diffusion run id"))

    def sample_store(self, sample_id: str) -> str:
        return join(self.url, _SAMPLES, _name(sample_id, "sample id"))

    def eval(self) -> str:
        """Where results plots are drawn (``results-<extractor>.png``)."""
        return join(self.url, _EVAL)

    def results(self) -> str:
        """The results table (one row per scored checkpoint and metric config)."""
        return join(self.url, _EVAL, "results")

    def figure(self, name: str) -> str:
        """A per-run figure (``<run id>_samples.png``, ``<run id>_loss.png``)."""
        return join(self.url, _EVAL, "figures", _name(name, "figure name"))

    def ae_eval(self, ae_fingerprint: str) -> str:
        """Reconstruction metrics and figures of one autoencoder."""
        return join(self.url, _EVAL, "ae", _name(ae_fingerprint, "AE fingerprint"))

    def raw_images(self, name: str) -> str:
        """Where the demo's generated class-folder images are written before packing."""
        return join(self.url, "raw", _name(name, "dataset name"))

    def prefect_results(self) -> str:
        return join(self.url, "prefect-results")

    def rerun_record(self, key: str) -> str:
        """The pointers of a finished command (``flows.rerun``)."""
        return join(self.url, ".dcae15", "reruns", f"{_name(key, 'rerun key')}.json")

    # -- what is there (URLs, sorted)
    def datasets(self) -> list[str]:
        return _visible(self.url, join(self.url, _DATA, "*"))

    def ae_models(self) -> list[str]:
        return _visible(self.url, join(self.url, *_AE_RUNS, "*", AE_MODEL))

    def latent_stores(self) -> list[str]:
        return _visible(self.url, join(self.url, _LATENTS, "*"))

    def diffusion_runs(self) -> list[str]:
        return _visible(self.url, join(self.url, *_DIFFUSION_RUNS, "*"))

    def sample_stores(self) -> list[str]:
        return _visible(self.url, join(self.url, _SAMPLES, "*"))

    def ae_evals(self, file_name: str) -> list[str]:
        """One file (e.g. ``proxy_check.json``) of every autoencoder evaluation."""
        return _visible(self.url, join(self.url, _EVAL, "ae", "*", file_name))

    def figures(self) -> list[str]:
        """Every PNG under ``eval/`` and ``runs/`` (results plots, run figures, AE evaluation figures)."""
        found: set[str] = set()
        for top in (_EVAL, "runs"):
            for pattern in ("*.png", "**/*.png"):
                found.update(_visible(self.url, join(self.url, top, pattern)))
        return sorted(found)


def _visible(root: str, pattern: str) -> list[str]:
    """``storage.urls.glob`` without hidden entries below ``root`` (``.<name>.lease``: the claims of
    ``storage.lease``); a root that itself sits under a hidden folder keeps its entries."""
    base = url_to_fs(root)[1].rstrip("/")
    return [u for u in _glob(pattern)
            if not any(part.startswith(".") for part in url_to_fs(u)[1][len(base):].split("/"))]


def _name(value: str, what: str) -> str:
    """One path component: ids and names never contain a separator (that would address another folder)."""
    value = str(value)
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"{what} {value!r} must be one non-empty path component without '/'")
    return value
