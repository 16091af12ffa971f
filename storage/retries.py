"""Count the object-storage requests this process made and how many of them had to be retried.

The retrying itself stays with the client: botocore retries each S3 call (``retries`` config: legacy mode, 5
attempts by default) and s3fs calls again on throttling / cut connections (``S3FileSystem(retries=5)``). Both happen
silently; this module makes them visible. A handler added to botocore's built-in handlers (so every session created
afterwards, s3fs's aiobotocore ones included, has it) sees each finished call (``after-call``) with botocore's
``RetryAttempts`` and the HTTP status: ``retried`` = botocore's extra attempts + answers that s3fs retries (5xx,
throttling). Counts are per process: Dask and torchrun workers count their own (``flows`` sums Dask workers' in).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["install", "snapshot", "since", "add", "add_workers", "process_snapshot", "describe"]

_THROTTLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
             "InternalError", "ServiceUnavailable", "503", "500"}
_counts = {"requests": 0, "retried": 0}
_lock = threading.Lock()
_installed = False


def _after_call(http_response: Any = None, parsed: Any = None, **_: Any) -> None:
    meta = (parsed or {}).get("ResponseMetadata", {}) if isinstance(parsed, dict) else {}
    retried = int(meta.get("RetryAttempts", 0) or 0)
    status = getattr(http_response, "status_code", 200)
    code = str(((parsed or {}).get("Error") or {}).get("Code", "")) if isinstance(parsed, dict) else ""
    if status >= 500 or code in _THROTTLE:
        retried += 1  # a failed answer: s3fs calls again (or the stage fails with it)
    with _lock:
        _counts["requests"] += 1
        _counts["retried"] += retried


def install() -> None:
    """Count from now on (idempotent; ``storage.urls`` calls it before it makes an S3 filesystem)."""
    global _installed
    if _installed:
        return
    import botocore.handlers

    botocore.handlers.BUILTIN_HANDLERS.append(("after-call.s3", _after_call))
    _installed = True


def snapshot() -> dict[str, int]:
    """This process's counts so far: ``{"requests", "retried"}``."""
    with _lock:
        return dict(_counts)


def since(before: dict[str, int]) -> dict[str, int]:
    """The counts added since ``before`` (a :func:`snapshot`)."""
    now = snapshot()
    return {k: now[k] - before.get(k, 0) for k in now}


def process_snapshot() -> tuple[int, dict[str, int]]:
    """(pid, :func:`snapshot`): what a Dask worker reports, so that in-process workers are not counted twice."""
    import os

    return os.getpid(), snapshot()


def add_workers(before: dict[Any, tuple[int, dict[str, int]]], after: dict[Any, tuple[int, dict[str, int]]]) -> None:
    """Add what other worker processes counted between two ``client.run(process_snapshot)`` answers."""
    import os

    for worker, (pid, now) in after.items():
        if pid != os.getpid():
            was = before.get(worker, (pid, {}))[1]
            add({k: now[k] - was.get(k, 0) for k in now})


def add(counts: dict[str, int]) -> None:
    """Add counts made elsewhere (a stage's Dask workers) to this process's, so the stage reports them too."""
    with _lock:
        for k in _counts:
            _counts[k] += int(counts.get(k, 0))


def describe(counts: dict[str, int]) -> str:
    """``object storage: 1234 requests, 84 retried`` (the stage's log line)."""
    return f"object storage: {counts['requests']} requests, {counts['retried']} retried"
