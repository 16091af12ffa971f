"""Diffusion checkpoints: DCP payloads inside the shared run directory (``storage.rundir.RunDir``), EMA loading."""

from __future__ import annotations

import contextlib
import warnings

import torch

from storage.rundir import RunDir
from storage.urls import is_local, url_to_fs

__all__ = ["open_run", "checkpoint_url", "read_latest", "read_run_config", "list_checkpoints", "dcp_writer",
           "dcp_reader", "load_ema_state", "read_train_state"]


def open_run(run_url: str, storage_options: dict | None = None) -> RunDir:
    """A diffusion run directory: the shared ``RunDir`` protocol with one DCP directory per checkpoint."""
    return RunDir(run_url, storage_options, kind="diffusion", checkpoint_suffix="")


def checkpoint_url(run_url: str, step: int) -> str:
    return open_run(run_url).checkpoint_url(step)


def read_latest(run_url: str, storage_options: dict | None = None) -> dict | None:
    """The ``latest`` pointer ({"step", "checkpoint"} with the checkpoint URL absolute) or None."""
    return open_run(run_url, storage_options).latest()


def read_run_config(run_url: str, storage_options: dict | None = None) -> dict:
    """The run's resolved ``config.yaml`` as a dict.

    Raises:
        FileNotFoundError: not a diffusion run directory.
    """
    conf = open_run(run_url, storage_options).config()
    if conf is None:
        raise FileNotFoundError(f"{run_url!r} has no config.yaml: not a diffusion run directory")
    return conf


def list_checkpoints(run_url: str, storage_options: dict | None = None) -> list[int]:
    """Steps of the checkpoint directories present (complete or not)."""
    return open_run(run_url, storage_options).checkpoints()


def dcp_writer(url: str, storage_options: dict | None = None):
    """A DCP storage writer for a local path or any fsspec URL."""
    from torch.distributed.checkpoint import FileSystemWriter

    if is_local(url):
        return FileSystemWriter(url_to_fs(url)[1])
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(url, **(storage_options or {}))


def dcp_reader(url: str, storage_options: dict | None = None):
    from torch.distributed.checkpoint import FileSystemReader

    if is_local(url):
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
    with quiet_single_process_load():
        dcp.load(state, storage_reader=dcp_reader(ckpt_url, storage_options),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state["app"][which][n])


@contextlib.contextmanager
def quiet_single_process_load():
    """DCP warns on every load outside a process group that it assumes a single process, which is what sampling,
    export and a one-rank trainer mean: that one warning is silenced, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def read_train_state(ckpt_url: str, storage_options: dict | None = None) -> dict:
    """The trainer's small state of a DCP checkpoint: step, world sizes, reader cursors, generator states."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    state = {"app": {"train": io.BytesIO()}}
    with quiet_single_process_load():
        dcp.load(state, storage_reader=dcp_reader(ckpt_url, storage_options),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
    blob = state["app"]["train"]
    blob.seek(0)
    return torch.load(blob, weights_only=True)
