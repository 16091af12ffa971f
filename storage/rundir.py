"""One run directory for every trainer (autoencoder and diffusion), and one rule for what makes two runs the same.

A run directory (any fsspec URL) holds::

    config.yaml            the run's config and its ``identity`` (written first; a different identity is refused)
    checkpoints/step-XXXXXXX<suffix>   trainer-specific payloads (AE: one torch ``.pt`` file; diffusion: a DCP dir)
    metrics.jsonl          one JSON row per logged step, rewritten up to the checkpoint's step before ``latest``
    latest                 ``{"step", "checkpoint"}`` (checkpoint relative to the run), written LAST: a checkpoint
                           is complete once ``latest`` names it; newer ones are interrupted saves
    done.json              the finished run's pointer (``steps`` it reached), written last of all

The payload format stays with the trainer (storage/ imports no torch): it writes the file or directory at
:meth:`RunDir.checkpoint_url` and then calls :meth:`RunDir.publish`.

Identity: a run's identity is the config fields that change its result — never the operational ones (logging,
checkpoint cadence, workers, device placement; marked ``metadata=OPERATIONAL``) and never the training length
(``metadata=HORIZON``): a longer run continues the shorter one. :func:`identity` reads those marks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from .urls import join, put_atomic, url_to_fs

__all__ = ["RunDir", "RunMismatchError", "OPERATIONAL", "HORIZON", "identity"]

#: field metadata: changes how a run is operated, not what it computes (left out of the identity)
OPERATIONAL = {"identity": "operational"}
#: field metadata: the training length; left out of the identity so that a longer run continues a shorter one
HORIZON = {"identity": "horizon"}

_CONFIG, _METRICS, _LATEST, _DONE, _CHECKPOINTS = "config.yaml", "metrics.jsonl", "latest", "done.json", "checkpoints"


def identity(cfg: Any, values: dict[str, Any] | None = None, *, keep_horizon: bool = False) -> dict[str, Any]:
    """The fields of dataclass config ``cfg`` that decide what its run computes.

    Args:
        cfg: a dataclass instance whose operational fields carry ``metadata=OPERATIONAL`` and whose length
            field carries ``metadata=HORIZON``.
        values: the field values to use (e.g. ``cfg.to_dict()``, JSON-safe); default ``dataclasses.asdict``.
        keep_horizon: keep the HORIZON fields (a config whose schedule depends on the length, e.g. cosine).
    """
    values = dataclasses.asdict(cfg) if values is None else values
    out = {}
    for f in dataclasses.fields(cfg):
        mark = f.metadata.get("identity")
        if mark == "operational" or (mark == "horizon" and not keep_horizon):
            continue
        out[f.name] = values[f.name]
    return out


class RunMismatchError(ValueError):
    """The run directory belongs to another run (different identity)."""


class RunDir:
    """The files of one run directory; every write is atomic (``storage.urls.put_atomic``).

    Args:
        url: the run directory.
        kind: what runs here, for messages ("AE", "diffusion").
        checkpoint_suffix: the checkpoint name's ending (".pt" for single files, "" for directories).
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, kind: str = "training",
                 checkpoint_suffix: str = "") -> None:
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options
        self.fs, root = url_to_fs(self.url, storage_options)
        self.root = root.rstrip("/")
        self.kind = kind
        self.suffix = checkpoint_suffix
        self._step_re = re.compile(r"^step-(\d{7,})" + re.escape(checkpoint_suffix) + "$")

    # -- plain files
    def child(self, *parts: str) -> str:
        """The URL of a file or folder inside the run (``model``, ``launch.yaml``, ...)."""
        return join(self.url, *parts)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self._path(*parts)))

    def read(self, *parts: str) -> bytes:
        return self.fs.cat_file(self._path(*parts))

    def write(self, data: bytes, *parts: str) -> None:
        put_atomic(self.fs, self._path(*parts), data)

    def _read_or_none(self, *parts: str) -> bytes | None:
        try:
            return self.read(*parts)
        except FileNotFoundError:
            return None

    # -- config and identity
    def config(self) -> dict | None:
        """``config.yaml`` as a dict, None before the run started."""
        import yaml

        raw = self._read_or_none(_CONFIG)
        return None if raw is None else yaml.safe_load(raw)

    def check(self, ident: str) -> None:
        """Refuse a directory started by a run of another identity (a new or empty directory passes).

        Raises:
            RunMismatchError: naming both identities and what to do.
        """
        old = self.config()
        if old is not None and "identity" not in old:
            raise RunMismatchError(
                f"{self.kind} run directory {self.url} has a config.yaml without an identity: it was written by an "
                "older dcae15, whose run folders are not readable. Use a fresh run directory (or another root)")
        if old is not None and old.get("identity") != ident:
            raise RunMismatchError(
                f"{self.kind} run directory {self.url} belongs to another run (identity {old.get('identity')!r}, "
                f"this run's is {ident!r}): a different config or input changes its result. Use a fresh run "
                "directory, or the original config (only operational fields and steps may change on resume)")

    def claim(self, ident: str, doc: dict[str, Any]) -> None:
        """Write ``config.yaml`` (``doc`` + ``identity``; only when it changed) unless the directory belongs to
        another run. The same identity may record other operational fields or steps.

        Raises:
            RunMismatchError: the directory was started by a run of another identity.
        """
        import yaml

        self.check(ident)
        body = yaml.safe_dump({"identity": ident, **doc}, sort_keys=False).encode()
        if self._read_or_none(_CONFIG) != body:  # a finished run resumed with the same config is not touched
            self.write(body, _CONFIG)

    # -- checkpoints and the latest pointer
    def checkpoint_name(self, step: int) -> str:
        return f"step-{int(step):07d}{self.suffix}"

    def checkpoint_url(self, step: int) -> str:
        return join(self.url, _CHECKPOINTS, self.checkpoint_name(step))

    def checkpoint_path(self, step: int) -> str:
        """The filesystem path of a checkpoint (for ``self.fs``)."""
        return self._path(_CHECKPOINTS, self.checkpoint_name(step))

    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints present, complete or not."""
        try:
            # refresh: other processes (trainers, DCP writers with their own filesystem instance) add checkpoints;
            # s3fs would answer from a listing cached before they existed.
            listing = self.fs.ls(self._path(_CHECKPOINTS), detail=False, refresh=True)
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listing]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := self._step_re.match(n)))

    def latest(self) -> dict | None:
        """``{"step", "checkpoint"}`` (checkpoint URL absolute) of the last complete checkpoint, or None."""
        raw = self._read_or_none(_LATEST)
        if raw is None:
            return None
        ptr = json.loads(raw)
        return {"step": int(ptr["step"]), "checkpoint": join(self.url, ptr["checkpoint"])}

    def publish(self, step: int, metrics: list[dict]) -> None:
        """The checkpoint of ``step`` is written: the metrics up to it, then ``latest`` (last)."""
        self.write_metrics([r for r in metrics if r["step"] <= step])
        body = {"step": int(step), "checkpoint": f"{_CHECKPOINTS}/{self.checkpoint_name(step)}"}
        self.write(json.dumps(body).encode(), _LATEST)  # a checkpoint is complete once named here

    def prune(self, keep: int, latest_step: int) -> None:
        """Delete all but the newest ``keep`` checkpoints; never the one ``latest`` names."""
        steps = [s for s in self.checkpoints() if s != latest_step]
        for s in steps[: max(0, len(steps) - (keep - 1))] if keep > 0 else []:
            self.fs.rm(self.checkpoint_path(s), recursive=True)

    def drop_partial(self, latest_step: int) -> None:
        """Checkpoints newer than ``latest`` are saves a kill interrupted: never complete, delete them."""
        for s in self.checkpoints():
            if s > latest_step:
                self.fs.rm(self.checkpoint_path(s), recursive=True)

    # -- metrics
    def metrics(self, upto: int | None = None) -> list[dict]:
        """The logged rows (up to step ``upto``: rows past the checkpoint are redone after a crash)."""
        raw = self._read_or_none(_METRICS)
        rows = [json.loads(line) for line in (raw or b"").decode().splitlines() if line.strip()]
        return rows if upto is None else [r for r in rows if r["step"] <= upto]

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` (one atomic object: object stores cannot append)."""
        self.write("".join(json.dumps(r) + "\n" for r in rows).encode(), _METRICS)

    # -- done marker
    def done(self) -> dict | None:
        """The finished run's pointer, None while it is not finished."""
        raw = self._read_or_none(_DONE)
        return None if raw is None else json.loads(raw)

    def finish(self, pointer: dict[str, Any]) -> None:
        """Write the done marker (last: the run is finished once it exists)."""
        self.write(json.dumps(pointer, indent=2).encode(), _DONE)
