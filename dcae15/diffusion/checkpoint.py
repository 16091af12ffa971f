"""Run-directory I/O for diffusion runs: DCP checkpoints, the `latest` pointer, config.yaml, EMA loading."""

from __future__ import annotations

import json
import re

import torch

from storage.urls import join, put_atomic, url_to_fs

__all__ = ["checkpoint_url", "read_latest", "write_latest", "read_run_config", "write_text", "list_checkpoints",
           "prune_checkpoints", "dcp_writer", "dcp_reader", "load_ema_state", "read_train_state"]

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def checkpoint_url(run_url: str, step: int) -> str:
    return join(run_url, "checkpoints", f"step-{step:07d}")


def read_latest(run_url: str, storage_options: dict | None = None) -> dict | None:
    """The ``latest`` pointer ({"step", "checkpoint"} with the checkpoint URL absolute) or None."""
    fs, path = url_to_fs(join(run_url, "latest"), storage_options)
    try:
        ptr = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    ptr["checkpoint"] = join(run_url, ptr["checkpoint"])
    return ptr


def write_latest(run_url: str, step: int, storage_options: dict | None = None) -> None:
    """Point ``latest`` at step ``step``'s checkpoint (relative, so a run dir can be moved). Written last."""
    fs, path = url_to_fs(join(run_url, "latest"), storage_options)
    body = {"step": int(step), "checkpoint": f"checkpoints/step-{step:07d}"}
    put_atomic(fs, path, json.dumps(body).encode())


def write_text(url: str, text: str, storage_options: dict | None = None) -> None:
    fs, path = url_to_fs(url, storage_options)
    put_atomic(fs, path, text.encode())


def read_run_config(run_url: str, storage_options: dict | None = None) -> dict:
    """The run's resolved ``config.yaml`` as a dict.

    Raises:
        FileNotFoundError: not a diffusion run directory.
    """
    import yaml

    fs, path = url_to_fs(join(run_url, "config.yaml"), storage_options)
    try:
        return yaml.safe_load(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_url!r} has no config.yaml: not a diffusion run directory") from None


def list_checkpoints(run_url: str, storage_options: dict | None = None) -> list[int]:
    """Steps of the checkpoint directories present (complete or not)."""
    fs, path = url_to_fs(join(run_url, "checkpoints"), storage_options)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.match(n)))


def prune_checkpoints(run_url: str, keep: int, latest_step: int, storage_options: dict | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints; never the one ``latest`` points at."""
    steps = [s for s in list_checkpoints(run_url, storage_options) if s != latest_step]
    drop = steps[: max(0, len(steps) - (keep - 1))] if keep > 0 else []
    for s in drop:
        fs, path = url_to_fs(checkpoint_url(run_url, s), storage_options)
        fs.rm(path, recursive=True)


def _is_local(url: str) -> bool:
    from storage.urls import is_local

    return is_local(url)


def dcp_writer(url: str, storage_options: dict | None = None):
    """A DCP storage writer for a local path or any fsspec URL."""
    from torch.distributed.checkpoint import FileSystemWriter

    if _is_local(url):
        return FileSystemWriter(url_to_fs(url)[1])
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, **(storage_options or {}))


def dcp_reader(url: str, storage_options: dict | None = None):
    from torch.distributed.checkpoint import FileSystemReader

    if _is_local(url):
        return FileSystemReader(url_to_fs(url)[1])
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **(storage_options or {}))


def load_ema_state(ckpt_url: str, model: torch.nn.Module, *, which: str = "ema",
                   storage_options: dict | None = None) -> None:
    """Load the EMA (``which='ema'``) or raw (``'model'``) weights of a DCP checkpoint into an unsharded model.

    Works without a process group; DCP reshards whatever world size wrote the checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r}; allowed: ('ema', 'model')")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {"app": {which: params}}
    dcp.load(state, storage_reader=dcp_reader(ckpt_url, storage_options),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state["app"][which][n])


def read_train_state(ckpt_url: str, storage_options: dict | None = None) -> dict:
    """The trainer's small state of a DCP checkpoint: step, world sizes, reader cursors, generator states."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    state = {"app": {"train": io.BytesIO()}}
    dcp.load(state, storage_reader=dcp_reader(ckpt_url, storage_options),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    blob = state["app"]["train"]
    blob.seek(0)
    return torch.load(blob, weights_only=True)
