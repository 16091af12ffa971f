"""The config files: the packaged presets, a preset name or YAML path to a file, and its raw mapping (``extends``).

Kept apart from :mod:`flows.config` (the typed sections, which embed the trainers' config classes and so import
torch) so that the CLI can list presets and read a config's ``root`` without importing torch.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CONFIG_DIR", "preset_names", "resolve_config_path", "read_raw_config"]

# The presets (demo, tiny, imagenet) are package data of flows (pyproject: package-data), so an installed wheel has
# them; the repository's configs/ is a link to this folder, not a second copy.
CONFIG_DIR = Path(str(resources.files("flows") / "configs"))

def preset_names() -> list[str]:
    """The config presets shipped with the package: ``demo``, ``tiny``, ``imagenet``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

def resolve_config_path(config: str | None) -> Path | None:
    """A preset name (``demo``, ``tiny``, ``imagenet``) or a path to a YAML file; None = the built-in defaults."""
    if config is None:
        return None
    if config in preset_names():
        return CONFIG_DIR / f"{config}.yaml"
    path = Path(config).expanduser()
    if not path.is_file():
        raise ValueError(f"config {config!r} is neither a preset ({', '.join(preset_names())}) nor an existing YAML file")
    return path

def read_raw_config(config: str | dict[str, Any] | None, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The plain mapping of a preset name / YAML path / dict, with ``extends: <preset or path>`` resolved: the named
    config is read first and this one's fields are merged over it (``rehearsal`` = ``imagenet`` with sizes reduced).

    Raises:
        ValueError: not a mapping, or an ``extends`` cycle.
    """
    if isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        path = resolve_config_path(config)
        raw = yaml.safe_load(path.read_text()) if path else {}
        raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {config!r}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str) or base in _seen:
        raise ValueError(f"config {config!r}: extends must name one preset or YAML file, without cycles; got {base!r}")
    return _overlay(read_raw_config(base, (*_seen, base)), raw)

def _overlay(base: Any, over: Any) -> Any:
    """``over`` merged onto the config it extends: mappings key by key, and lists of mappings of the same length
    item by item (the rehearsal gives each AE phase its sizes only); any other value replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _overlay(base[k], v) if k in base else v for k, v in over.items()}}
    if (isinstance(base, list) and isinstance(over, list) and len(base) == len(over)
            and all(isinstance(x, dict) for x in [*base, *over])):
        return [_overlay(b, o) for b, o in zip(base, over)]
    return copy.deepcopy(over)

