"""Helpers shared by the stage flows: the resolved config of a run (pointers live in flows/pointers.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flows.env import local_root

if TYPE_CHECKING:
    from flows.config import PipelineConfig

__all__ = ["ConfigArg", "stage_config"]

ConfigArg = str | dict[str, Any] | None
"""A flow's ``config`` parameter: a preset name (demo, tiny), a YAML path, a dict, or None (built-in defaults)."""


def stage_config(root: str | None, config: ConfigArg, **overrides: Any) -> PipelineConfig:
    """Load the config, put ``root`` (made absolute when local) and any nested overrides in, validate."""
    from flows.config import load_config  # here, not at the top: keeps the flows' module-level import chains short

    extra: dict[str, Any] = dict(overrides)
    if root:
        extra["root"] = root
    cfg = load_config(config, extra)
    cfg.root = local_root(cfg.root)
    return cfg
