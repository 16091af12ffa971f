"""Caching rules for stage tasks: small pointer results keyed by inputs + task source + library code version,
persisted to configurable result storage, and never returned when the artifact they point at is gone."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.filesystems import RemoteFileSystem

from flows import forksafe

forksafe.install()  # DataLoader workers forked in a flow run must not die at exit (see flows/forksafe.py)

__all__ = ["BackboneSource", "CodeVersion", "STAGE_CACHE", "stage_cache", "code_version", "result_storage_for",
           "run_cached"]

_LIB_DIRS = ("storage", "dcae15", "flows")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """dcae15's version plus a hash of the library sources, so that editing library code invalidates caches.

    TASK_SOURCE only hashes the task function itself; the work happens in ``storage/`` and ``dcae15/``.
    """
    import dcae15

    h = hashlib.sha256(getattr(dcae15, "__version__", "0").encode())
    base = Path(__file__).resolve().parent.parent
    for pkg in _LIB_DIRS:
        for path in sorted((base / pkg).rglob("*.py")):
            h.update(str(path.relative_to(base)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


class CodeVersion(CachePolicy):
    """A cache-key component that changes whenever the library code changes."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        return code_version()


class BackboneSource(CachePolicy):
    """A cache-key component: the source fingerprint of an import-path ``backbone`` input (empty for a preset),
    so that editing the user's model code trains a new run instead of returning the cached pointer of the old."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        from dcae15.models.plugin import is_import_path, source_fingerprint

        backbone = inputs.get("backbone")
        return source_fingerprint(backbone) if is_import_path(backbone) else ""


def stage_cache(*exclude: str) -> CachePolicy:
    """INPUTS (minus arguments that say where work runs, not what it computes) + TASK_SOURCE + code version."""
    inputs = INPUTS
    for name in exclude:
        inputs = inputs - name
    return inputs + TASK_SOURCE + CodeVersion()


STAGE_CACHE = stage_cache()


def result_storage_for(url: str | None):
    """Prefect result storage for a local directory (a Path) or any fsspec URL (a saved RemoteFileSystem block).

    Prefect requires a flow's remote result storage to be a block saved server-side; the block holds only the
    base URL, so credentials for remote storage keep coming from the environment (AWS_* / fsspec config) and
    never reach the API database. None = Prefect's default (``PREFECT_RESULTS_LOCAL_STORAGE_PATH``).
    """
    if url is None:
        return None
    from storage.urls import is_local, local_path

    if not is_local(url):
        from storage.fingerprint import short_id

        block = RemoteFileSystem(basepath=url.rstrip("/"))
        block.save(f"dcae15-results-{short_id(url)}", overwrite=True)
        return block
    path = Path(local_path(url))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_cached(task: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a cached stage task; if its result came from the cache but the artifact is gone or incomplete, recompute.

    Args:
        task: a Prefect task returning a pointer (flows/pointers.py), checked with ``flows.pointers.validate``.
        kwargs: the task's arguments.

    Returns:
        A pointer whose artifact was validated.
    """
    state = task(**kwargs, return_state=True)
    pointer = state.result()
    if state.name != "Cached":
        return pointer  # fresh work: the task validated its own output before returning
    from flows.pointers import validate

    problem = validate(pointer)
    if problem is None:
        return pointer
    get_run_logger().warning("cached result of %s is stale (%s): recomputing", task.name, problem)
    return task.with_options(refresh_cache=True)(**kwargs)
