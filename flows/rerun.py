"""A cached rerun without starting Prefect: the command's stage pointers are checked before any API starts.

Why: a rerun of ``dcae15 demo`` whose every stage is cached used to cost ~26-34 s, most of it Prefect's temporary
local server starting (no ``PREFECT_API_URL``), for work that amounts to checking that each stage's output is
still there. Every stage flow publishes its output pointer (flows/artifacts.py), which also records it here; when
a ``demo`` / ``pipeline`` command completes, the CLI writes the recorded pointers to
``<root>/.dcae15/reruns/<key>.json``, keyed by (command, resolved config, backbones, library code version). The
next identical command re-validates every pointer with its stage's own validator (the same check a cached Prefect
task result gets) and, if all hold, prints the outputs without starting Prefect. Anything missing, changed or
unreadable, and the command runs through Prefect as usual (where only the stale stages recompute).
``--through-prefect`` skips the shortcut; so does a ``PREFECT_API_URL`` (a running server starts nothing).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

__all__ = ["shortcut_allowed", "record", "reset", "recorded", "record_key", "save_record", "check_record"]

_LEDGER: list[dict[str, Any]] = []


def shortcut_allowed() -> bool:
    """Only without a Prefect API to talk to: with ``PREFECT_API_URL`` (a running server) a cached rerun costs
    seconds and belongs in that server's UI like any other run."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is None


def _stamp(url: str) -> dict[str, list[Any]]:
    """(size, ETag or mtime) of every object under ``url``: unchanged objects have the same stamp."""
    from storage.urls import url_to_fs

    fs, path = url_to_fs(url)
    out = {}
    for info in fs.ls(path, detail=True):
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
        out[info["name"].rstrip("/").rsplit("/", 1)[-1]] = [info.get("size"), str(tag)]
    return out


def record(stage: str, pointer: dict[str, Any]) -> None:
    """Remember one stage output of this process's command (called when a stage publishes its pointer).

    A saved autoencoder is also stamped (its files' sizes and ETags / mtimes): checking the stamp on a rerun avoids
    importing diffusers and loading the network just to recompute its fingerprint (~7 s of a ~19 s rerun here).
    """
    entry: dict[str, Any] = {"stage": stage, "pointer": pointer}
    if stage == "autoencoder":
        try:
            entry["stamp"] = _stamp(pointer["url"])
        except Exception:  # noqa: BLE001 - no stamp: the rerun check loads the model instead
            pass
    _LEDGER.append(entry)


def reset() -> None:
    _LEDGER.clear()


def recorded() -> list[dict[str, Any]]:
    return list(_LEDGER)


def _plugin_sources(config: dict[str, Any], extra: dict[str, Any]) -> dict[str, str | None]:
    """Source fingerprints of the import-path backbones the command trains (None: not found; the run will say)."""
    from dcae15.models.plugin import BackboneError, is_import_path, source_fingerprint

    diffusion = config.get("diffusion") if isinstance(config.get("diffusion"), dict) else {}
    out: dict[str, str | None] = {}
    for name in [*(diffusion.get("backbones") or []), *(extra.get("backbones") or [])]:
        if is_import_path(name):
            try:
                out[name] = source_fingerprint(name)
            except BackboneError:
                out[name] = None
    return out


def record_key(command: str, config: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """Identity of a command: its name, the resolved config, extra arguments, the library code version and the
    source files of its import-path backbones (an edited plug-in is never answered from an old record)."""
    from flows.caching import code_version

    doc = {"command": command, "config": config, "extra": extra or {}, "code": code_version()}
    plugins = _plugin_sources(config, extra or {})
    if plugins:  # absent for presets only: their records keep their keys
        doc["backbone_sources"] = plugins
    blob = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _record_url(root: str, key: str) -> str:
    from storage.layout import Root

    return Root(root).rerun_record(key)


def _validators() -> dict[str, Callable[[dict[str, Any]], str | None]]:
    """Per recorded stage, the check of its pointer: the stages' own rule (flows/pointers.py); a figure is a file."""
    from flows.pointers import validate
    from storage.urls import exists

    stages = ("prepare", "autoencoder", "encode", "train", "sample", "evaluate", "evaluate-ae")
    return {**{s: validate for s in stages}, "figure": lambda p: None if exists(p["url"]) else "figure missing"}


def save_record(root: str, key: str) -> str | None:
    """Write this process's recorded pointers for ``key``; returns the URL (None when nothing was recorded)."""
    from storage.urls import write_atomic

    entries = recorded()
    if not entries:
        return None
    url = _record_url(root, key)
    write_atomic(url, json.dumps({"key": key, "entries": entries}, default=str).encode())
    return url


def check_record(root: str, key: str) -> str | None:
    """None if the record for ``key`` exists and every pointer in it still validates; else why not."""
    from storage.urls import exists, read_bytes

    url = _record_url(root, key)
    try:
        if not exists(url):
            return "no record of an identical finished command"
        entries = json.loads(read_bytes(url))["entries"]
    except Exception as exc:  # noqa: BLE001 - an unreadable record only means "run through Prefect"
        return f"cannot read {url}: {exc}"
    validators = _validators()
    for entry in entries:
        check = validators.get(entry["stage"])
        if check is None:
            return f"unknown stage {entry['stage']!r} in {url}"
        if "stamp" in entry:
            try:
                same = _stamp(entry["pointer"]["url"]) == entry["stamp"]
            except Exception:  # noqa: BLE001
                same = False
            problem = None if same else "files changed or missing"
        else:
            problem = check(entry["pointer"])
        if problem is not None:
            return f"{entry['stage']}: {problem}"
    return None
