"""Prefect settings for a command-line run, applied before Prefect is imported (it reads them at import)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["local_root", "prefect_home_for", "apply_prefect_defaults"]


def local_root(root: str) -> str:
    """A local root as an absolute path (cache keys and run ids must not depend on the working directory)."""
    if "://" in root and not root.startswith("file://"):
        return root.rstrip("/")
    return str(Path(root.removeprefix("file://")).expanduser().resolve())


def prefect_home_for(root: str) -> Path:
    """Where Prefect keeps its local database: inside a local root, else in the user's cache directory."""
    if "://" in root and not root.startswith("file://"):
        return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dcae15" / "prefect"
    return Path(local_root(root)) / ".prefect"


def apply_prefect_defaults(root: str) -> None:
    """Offline-friendly defaults for Prefect's ephemeral local API; values the user already set are kept.

    Without ``PREFECT_API_URL`` Prefect starts a temporary local server for the run (about 10-20 s here); with it,
    runs go to that server (``prefect server start``) and appear in its UI.
    """
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault("PREFECT_HOME", str(prefect_home_for(root)))
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # Prefect makes one level only
        os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a cold start of the temporary server took ~14 s here; Prefect's default timeout is 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
