"""Persistence for dcae15: URLs, raw image shards, Zarr latent/sample stores, streaming readers.

Submodules are imported on use (``from storage.latent_store import LatentStore``); importing ``storage`` itself
loads nothing heavy (no torch, no zarr), so Dask tasks and Prefect flows can import it cheaply.
"""

__all__ = ["urls", "units", "latent_store", "sample_store", "reader", "images", "shards", "fingerprint", "synthetic"]
