"""Prefect settings for a command-line run, applied before Prefect is imported (it reads them at import)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["local_root", "prefect_home_for", "apply_prefect_defaults", "prepare_prefect_database", "apply_cpu_defaults"]


def local_root(root: str) -> str:
    """A local root as an absolute path (cache keys and run ids must not depend on the working directory)."""
    from storage.urls import is_local, local_path

    return local_path(root) if is_local(root) else root.rstrip("/")


def prefect_home_for(root: str) -> Path:
    """Where Prefect keeps its local database: inside a local root, else in the user's cache directory."""
    from storage.urls import is_local

    if not is_local(root):
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


def prepare_prefect_database() -> None:
    """Create (or upgrade) the temporary server's database once per Prefect version, under its lease
    (``storage.lease``), before this command's temporary server starts; a no-op with ``PREFECT_API_URL``.

    Every temporary server migrates its database when it starts. Two commands started together on a fresh Prefect
    home would both create the tables, and one server would die printing a traceback ("table ... already exists").
    The first command migrates here while the others wait on the lease, then finds the marker; after that the
    servers' own migrations find the database at its head and do nothing. Costs ~5 s once, nothing afterwards.
    """
    if "PREFECT_API_URL" in os.environ:
        return
    from importlib.metadata import version

    home = Path(os.environ["PREFECT_HOME"]).expanduser()
    ready = home / f".database-ready-{version('prefect')}"
    if ready.exists():
        return
    import asyncio

    from storage.lease import claim

    with claim(str(home / "prefect.db"), what="Prefect database"):
        if ready.exists():  # another command migrated it while this one waited
            return
        from prefect.server.database import provide_database_interface

        asyncio.run(provide_database_interface().create_db())
        ready.touch()


def apply_cpu_defaults() -> None:
    """One intra-op thread per process unless ``OMP_NUM_THREADS`` says otherwise (torchrun's own default too).

    The demo's tiny models run 10-50x slower with 2 threads than with 1 when anything else shares the cores
    (measured: DiT-tiny step 0.045 s vs 2.5 s), and Dask workers / torchrun children inherit the setting.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # already imported: the variable alone would come too late for this process
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
