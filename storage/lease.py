"""One writer per artifact: a lease object next to the artifact, taken before writing, renewed while the job lives.

A lease is a small JSON object at ``<parent>/.<name>.lease`` (a hidden sibling of the artifact, so deleting or
recreating the artifact never touches it, and ``storage.layout`` listings skip it)::

    {"holder": "pid 4242 on gpu-01", "token": "<random>", "artifact": "latent store s3://...", "acquired": t0,
     "renewed": t, "expires": t + ttl, "host": "gpu-01", "pid": 4242, "flow_run": "<id or null>"}

Every change is conditional, so two processes never both believe they hold it:

- ``s3://``: ``PutObject`` with ``If-None-Match: *`` to take a free lease and ``If-Match: <ETag>`` to renew or
  take over an expired one (S3 and moto answer 412 when another writer got there first);
- local disk: the read-decide-write happens under a POSIX record lock (``fcntl.lockf``) on the lease file, which
  the kernel drops when its process dies; the file is rewritten in place and emptied (not unlinked) on release;
- ``memory://`` (one process): a process-wide lock.

A holder renews the lease every ``ttl / 3`` from a daemon thread; a lease whose ``expires`` has passed (its holder
was SIGKILLed, its machine lost) is taken over by the next writer, and one whose holder process is gone from this
very host is taken over at once. Expiry compares wall clocks: hosts sharing a root need clocks within a small
fraction of ``ttl`` (NTP). A holder that could not renew before its own expiry stops renewing and reports the lease
lost (:attr:`Lease.lost`), so it never overwrites a lease taken over from it.

``claim()`` is the context manager writers use; it is re-entrant within a thread (an inner claim of an artifact
the thread already holds is a no-op), so a flow can claim around a library call that claims again.
``rank_zero_claim()`` is the same claim for a job run as several ranks (torchrun): rank 0 holds the lease, the
other ranks wait for its word.

This module is the project's one claim mechanism: whatever writes an artifact (a stage of a flow run, a library
call from a script, a torchrun job, an experiment driver) holds the artifact's lease, and nothing else decides who
writes. What users see:

- a second writer of a busy artifact says once ``waiting: <what> <url> is being written by <holder>, ...`` and
  goes on when it is free (``$DCAE15_CLAIM_WAIT`` seconds: refuse after that wait instead, ``0`` at once);
- a rerun after its holder was killed (``kill -9``, a lost machine) says once ``took over <what> ...`` and resumes:
  at once when the dead holder ran on this host, else when its lease expires (``$DCAE15_LEASE_SECONDS``, default
  60; the waiting line says how long is left);
- the Prefect API is not involved: two commands on two temporary Prefect servers, or on none, exclude each other
  the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from .urls import join, protocol_of, url_to_fs

__all__ = ["LeaseConfig", "Lease", "ClaimHeldError", "LeaseLostError", "claim", "claimed", "rank_zero_claim",
           "lease_url", "describe_holder", "LEASE_SECONDS_ENV", "CLAIM_WAIT_ENV"]

#: environment: seconds a lease lives without renewal (default 60)
LEASE_SECONDS_ENV = "DCAE15_LEASE_SECONDS"
#: environment: seconds a second writer waits for a held artifact before refusing ("" or unset: wait until free)
CLAIM_WAIT_ENV = "DCAE15_CLAIM_WAIT"


class ClaimHeldError(RuntimeError):
    """Another live writer holds the artifact; the message is one line naming it, the holder and what to do."""


class LeaseLostError(RuntimeError):
    """This writer's lease expired or was taken over (it could not renew in time)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeaseConfig:
    """How long a lease lives and how long a second writer waits."""

    ttl: float = 60.0
    """seconds a lease lives without renewal; renewed every ttl/3 (a SIGKILLed holder blocks others this long)"""
    wait: float | None = None
    """seconds to wait for a held artifact before refusing: None = until it is free, 0 = refuse at once"""
    poll: float | None = None
    """seconds between looks while waiting (default: ttl/6, at most 5 s)"""

    def __post_init__(self) -> None:
        if not self.ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {self.ttl}")
        if self.wait is not None and self.wait < 0:
            raise ValueError(f"claim wait must be >= 0 seconds or None (wait until free), got {self.wait}")

    @property
    def poll_seconds(self) -> float:
        return self.poll if self.poll is not None else min(self.ttl / 6, 5.0)

    @classmethod
    def from_env(cls, **overrides: Any) -> "LeaseConfig":
        """``$DCAE15_LEASE_SECONDS`` and ``$DCAE15_CLAIM_WAIT`` (unset: the defaults), then ``overrides``."""
        kw: dict[str, Any] = {}
        for env, field in ((LEASE_SECONDS_ENV, "ttl"), (CLAIM_WAIT_ENV, "wait")):
            raw = os.environ.get(env, "").strip()
            if raw:
                try:
                    kw[field] = float(raw)
                except ValueError:
                    raise ValueError(f"${env} must be a number of seconds, got {raw!r}") from None
        return cls(**{**kw, **overrides})


def lease_url(artifact_url: str) -> str:
    """Where the lease of the artifact at ``artifact_url`` lives: its hidden sibling ``.<name>.lease``."""
    url = str(artifact_url).rstrip("/")
    if not url_to_fs(url)[1].strip("/"):
        raise ValueError(f"cannot claim {artifact_url!r}: it names no artifact (an empty path)")
    parent, name = url.rsplit("/", 1) if "/" in url else (".", url)
    if parent.endswith(":/"):  # an artifact at the top of a filesystem (memory://packed): keep the scheme's "//"
        return f"{parent}/.{name}.lease"
    return join(parent, f".{name}.lease")


def describe_holder(doc: dict, now: float | None = None) -> str:
    """``pid 4242 on gpu-01 (flow run …), lease renewed 3 s ago, expires in 57 s`` for messages."""
    now = time.time() if now is None else now
    who = doc.get("holder", "an unknown writer")
    if doc.get("flow_run"):
        who += f" (flow run {doc['flow_run']})"
    ago, left = now - float(doc.get("renewed", now)), float(doc.get("expires", now)) - now
    return f"{who}, lease renewed {ago:.0f} s ago, expires in {max(left, 0):.0f} s"


# ------------------------------------------------------------------------------------------------ backends
class _Backend:
    """Conditional operations on one lease object. ``version`` is whatever proves we read what we replace."""

    def read(self) -> tuple[dict | None, Any]:
        """(lease doc or None when free, version)."""
        raise NotImplementedError

    def swap(self, version: Any, doc: dict | None) -> bool:
        """Write ``doc`` (None: free it) only if the object is still at ``version``; True when it was written."""
        raise NotImplementedError

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section in which read + swap are atomic together (backends whose swap is conditional need none)."""
        yield


class _S3Backend(_Backend):
    """Conditional PUTs: ``If-None-Match: *`` (create) and ``If-Match: <ETag>`` (replace)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, (self.bucket, self.key, _) = fs, fs.split_path(path)

    def _run(self, coro_fn: Callable[..., Any], *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, coro_fn, *args)

    def read(self) -> tuple[dict | None, Any]:
        async def get():
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None, None
            body = await resp["Body"].read()
            return body, resp["ETag"]

        body, etag = self._run(get)
        return _parse(body), etag

    def swap(self, version: Any, doc: dict | None) -> bool:
        body = b"" if doc is None else json.dumps(doc).encode()
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **cond)
        except FileExistsError:  # 412 on If-None-Match: another writer created it first
            return False
        except OSError as exc:  # 412 on If-Match (s3fs: EINVAL), or 404: the object changed under us
            if _is_precondition(exc):
                return False
            raise
        return True


def _is_precondition(exc: BaseException) -> bool:
    import errno

    text = f"{exc} {exc.__cause__}"
    return getattr(exc, "errno", None) == errno.EINVAL or "PreconditionFailed" in text or "412" in text \
        or isinstance(exc, FileNotFoundError)


_LOCAL_LOCK = threading.Lock()


class _LocalBackend(_Backend):
    """A POSIX record lock on the lease file around read-decide-write; the kernel drops it if the process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with _LOCAL_LOCK:  # POSIX record locks do not exclude threads of one process (and any close drops them)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)  # held for a read and a small write, never across the job
                self._fd = fd
                yield
            finally:
                self._fd = None
                os.close(fd)  # closing releases the lock

    def read(self) -> tuple[dict | None, Any]:
        if self._fd is None:
            raise RuntimeError("local lease read outside its critical section")
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        return _parse(b"".join(chunks)), None

    def swap(self, version: Any, doc: dict | None) -> bool:
        body = b"" if doc is None else json.dumps(doc).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, body)
        os.fsync(self._fd)
        return True


_MEMORY_LOCK = threading.RLock()


class _MemoryBackend(_Backend):
    """fsspec's memory filesystem lives in this process: a process-wide lock makes read + write atomic."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        with _MEMORY_LOCK:
            yield

    def read(self) -> tuple[dict | None, Any]:
        try:
            return _parse(self.fs.cat_file(self.path)), None
        except FileNotFoundError:
            return None, None

    def swap(self, version: Any, doc: dict | None) -> bool:
        self.fs.pipe_file(self.path, b"" if doc is None else json.dumps(doc).encode())
        return True


def _parse(body: bytes | None) -> dict | None:
    if not body:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None  # a torn or foreign object is no valid lease: treat as free (it has no expiry to honour)
    return doc if isinstance(doc, dict) and "token" in doc else None


def _backend(url: str, storage_options: dict | None) -> _Backend:
    proto = protocol_of(url)
    fs, path = url_to_fs(url, storage_options)
    if proto == "file":
        return _LocalBackend(path)
    if proto == "s3":
        return _S3Backend(fs, path)
    if proto == "memory":
        return _MemoryBackend(fs, path)
    raise ValueError(f"claims (one writer per artifact) support file, s3 and memory URLs, not {proto!r} ({url})")


# ------------------------------------------------------------------------------------------------ the lease
def _holder_alive_here(doc: dict) -> bool:
    """False only when the holder ran on this host and its process is gone (a stale lease of a dead process)."""
    if doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
        return True
    try:
        os.kill(doc["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease of one artifact. Most callers use :func:`claim`; this is the object it yields.

    Args:
        artifact_url: the artifact (a store, a run directory, a results part file, ...).
        what: what it is, for messages ("latent store", "diffusion run", ...).
        config: ttl and wait (default :meth:`LeaseConfig.from_env`).
    """

    def __init__(self, artifact_url: str, *, what: str = "artifact", storage_options: dict | None = None,
                 config: LeaseConfig | None = None) -> None:
        self.artifact_url, self.what = str(artifact_url).rstrip("/"), what
        self.url = lease_url(self.artifact_url)
        self.config = config or LeaseConfig.from_env()
        self._backend = _backend(self.url, storage_options)
        self.token = uuid.uuid4().hex
        self._expires = 0.0
        self._acquired = 0.0
        self.lost = False
        self.renewals = 0
        self.took_over: dict | None = None  # the stale lease this one replaced, if any

    @property
    def name(self) -> str:
        return f"{self.what} {self.artifact_url}"

    def _doc(self, now: float) -> dict:
        host = socket.gethostname()
        return {"holder": f"pid {os.getpid()} on {host}", "token": self.token, "artifact": self.name,
                "host": host, "pid": os.getpid(), "flow_run": os.environ.get("PREFECT__FLOW_RUN_ID") or None,
                "acquired": self._acquired or now, "renewed": now, "expires": now + self.config.ttl}

    def holder(self) -> dict | None:
        """The current lease document (None when the artifact is free)."""
        with self._backend.critical():
            return self._backend.read()[0]

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free, expired or ours; returns None on success, else the holder's document."""
        with self._backend.critical():
            doc, version = self._backend.read()
            now = time.time()
            if doc is not None and doc.get("token") != self.token:
                if float(doc.get("expires", 0)) > now and _holder_alive_here(doc):
                    return doc
                stale = doc
            else:
                stale = None
            self._acquired = now
            new = self._doc(now)
            if not self._backend.swap(version, new):
                doc = self._backend.read()[0]
                if doc is None or doc.get("token") != self.token:  # ours only when a retried PUT had succeeded
                    return doc or {"holder": "another writer (it took the lease at this moment)"}
            self._expires, self.lost, self.took_over = new["expires"], False, stale
            return None

    def renew(self) -> bool:
        """Extend the lease by ``ttl``; False (and :attr:`lost`) when it expired or was taken over."""
        if self.lost:
            return False
        if time.time() >= self._expires:  # never write over a lease that may already belong to someone else
            self.lost = True
            return False
        with self._backend.critical():
            doc, version = self._backend.read()
            if doc is None or doc.get("token") != self.token:
                self.lost = True
                return False
            new = self._doc(time.time())
            if not self._backend.swap(version, new):
                self.lost = True
                return False
            self._expires = new["expires"]
            self.renewals += 1
            return True

    def release(self) -> None:
        """Free the lease if it is still ours (a lease taken over after expiry is left to its new holder)."""
        with self._backend.critical():
            doc, version = self._backend.read()
            if doc is not None and doc.get("token") == self.token:
                if isinstance(self._backend, _S3Backend):
                    try:
                        self._backend.fs.call_s3("delete_object", Bucket=self._backend.bucket,
                                                 Key=self._backend.key)
                    except FileNotFoundError:
                        pass
                else:
                    self._backend.swap(version, None)
        self._expires = 0.0

    def ensure(self) -> None:
        """Raise :class:`LeaseLostError` when this writer no longer holds the lease (call before committing)."""
        if self.lost or time.time() >= self._expires:
            self.lost = True
            raise LeaseLostError(f"lost the claim on {self.name}: its lease expired or was taken over (this "
                                 f"process could not renew it within {self.config.ttl:.0f} s); stop and rerun")


# ------------------------------------------------------------------------------------------------ claim
# (lease URL, thread) -> (lease, depth): the claims this thread holds (re-entrant). Per thread, so that two threads of
# one process (concurrent Prefect tasks) writing the same artifact still exclude each other.
_HELD: dict[tuple[str, int], tuple[Lease, int]] = {}
_HELD_LOCK = threading.Lock()


def _refuse(lease: Lease, doc: dict, waited: float) -> ClaimHeldError:
    how = f" after waiting {waited:.0f} s" if waited >= 1 else ""
    return ClaimHeldError(
        f"refused{how}: {lease.name} is being written by {describe_holder(doc)}. Let that job finish and rerun "
        f"(the rerun finds its result), raise ${CLAIM_WAIT_ENV} to wait longer, or - if that job is gone - rerun "
        f"after its lease expires")


@contextlib.contextmanager
def claim(artifact_url: str, *, what: str = "artifact", storage_options: dict | None = None,
          config: LeaseConfig | None = None, log: Callable[[str], None] | None = None) -> Iterator[Lease]:
    """Hold the artifact's lease for the body: wait for (or refuse) another live writer, renew it while the body
    runs, release it at the end (also on error; a SIGKILLed holder's lease expires after ``ttl``).

    Args:
        artifact_url: the artifact to write.
        what: what it is, for messages.
        config: ttl / wait / poll (default :meth:`LeaseConfig.from_env`).
        log: where one-line notes go (waiting, taking over a stale lease); default ``print``.

    Raises:
        ClaimHeldError: another live writer held it longer than ``config.wait`` (one line: artifact, holder, what
            to do).
    """
    log = log or (lambda msg: print(msg, flush=True))
    key = (lease_url(artifact_url), threading.get_ident())
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            _HELD[key] = (held[0], held[1] + 1)
    if held is not None:  # this process already holds it (a flow around a library writer): nothing more to take
        try:
            yield held[0]
        finally:
            with _HELD_LOCK:
                lease, depth = _HELD[key]
                _HELD[key] = (lease, depth - 1)
        return

    lease = Lease(artifact_url, what=what, storage_options=storage_options, config=config)
    cfg, t0, told = lease.config, time.monotonic(), False
    while (doc := lease.try_acquire()) is not None:
        waited = time.monotonic() - t0
        if cfg.wait is not None and waited >= cfg.wait:
            raise _refuse(lease, doc, waited)
        if not told:
            log(f"waiting: {lease.name} is being written by {describe_holder(doc)}; this job continues once it is "
                f"free, or once that lease expires if its writer is gone (${CLAIM_WAIT_ENV}=0 refuses instead)")
            told = True
        time.sleep(cfg.poll_seconds if cfg.wait is None else min(cfg.poll_seconds, max(cfg.wait - waited, 0.05)))
    if lease.took_over is not None:
        log(f"took over {lease.name}: the lease of {describe_holder(lease.took_over)} had expired or its process "
            "is gone; resuming from what it left")

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(cfg.ttl / 3):
            try:
                if not lease.renew():
                    log(f"lost the claim on {lease.name}: its lease expired before it could be renewed")
                    return
            except Exception as exc:  # noqa: BLE001 - a transient storage error: try again next beat
                log(f"could not renew the lease of {lease.name} ({type(exc).__name__}: {exc}); retrying")

    beat = threading.Thread(target=heartbeat, name=f"lease {key[0]}", daemon=True)
    with _HELD_LOCK:
        _HELD[key] = (lease, 1)
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        with _HELD_LOCK:
            _HELD.pop(key, None)
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - the body's own error matters more; the lease expires anyway
            log(f"could not release the lease of {lease.name} ({type(exc).__name__}: {exc}); it expires in "
                f"{cfg.ttl:.0f} s")


def claimed(what: str, url_arg: str, options_arg: str = "storage_options") -> Callable[[Callable], Callable]:
    """Decorate a writer so that its whole call runs under :func:`claim` of the artifact named by its argument
    ``url_arg`` (storage options from ``options_arg``): ``@claimed("packed dataset", "dst_url")``."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            with claim(bound.arguments[url_arg], what=what, storage_options=bound.arguments.get(options_arg)):
                return fn(*args, **kwargs)

        return guarded

    return wrap


# ------------------------------------------------------------------------------------------------ several ranks
# Every rank makes the same claims in the same order, so a per-process counter names each claim's key.
_RANK_CLAIMS = itertools.count()
_HELD_WORD, _REFUSED_WORD = "held", "refused:"


@contextlib.contextmanager
def rank_zero_claim(url: str, *, what: str, storage_options: dict | None = None) -> Iterator[Lease | None]:
    """:func:`claim` for a job that may run as several ranks: rank 0 (the only rank of a plain process) holds the
    artifact's lease for the body; the other ranks enter the body once rank 0 holds it. Yields the lease on rank 0,
    None elsewhere.

    The other ranks poll the process group's key-value store instead of waiting in a collective: a second training
    of a run may wait hours for the first, longer than any NCCL / gloo collective timeout.

    Raises:
        ClaimHeldError: on every rank, when rank 0 was refused (another live writer holds the artifact).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        with claim(url, what=what, storage_options=storage_options) as lease:
            yield lease
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store, key = _get_default_store(), f"dcae15/claim/{next(_RANK_CLAIMS)}"
    if dist.get_rank() != 0:
        while not store.check([key]):
            time.sleep(0.5)
        word = store.get(key).decode()
        if word.startswith(_REFUSED_WORD):
            raise ClaimHeldError(word[len(_REFUSED_WORD):])
        if word != _HELD_WORD:
            raise RuntimeError(f"rank 0 could not claim {what} {url}: {word}")
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            lease = stack.enter_context(claim(url, what=what, storage_options=storage_options))
        except ClaimHeldError as exc:
            store.set(key, _REFUSED_WORD + str(exc))
            raise
        except BaseException as exc:
            store.set(key, f"{type(exc).__name__}: {exc}")
            raise
        store.set(key, _HELD_WORD)
        yield lease
