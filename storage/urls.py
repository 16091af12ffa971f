"""The one place that parses storage URLs: fsspec filesystems, Zarr stores, joins, atomic puts, masked options."""

from __future__ import annotations

import os
import uuid
from typing import Any

__all__ = [
    "url_to_fs",
    "zarr_store",
    "join",
    "exists",
    "mask_options",
    "protocol_of",
    "is_local",
    "local_path",
    "scheme_prefix",
    "glob",
    "put_atomic",
    "write_atomic",
    "read_bytes",
]

_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")
_KNOWN = ("file", "local", "s3", "s3a", "memory")


def protocol_of(url: str) -> str:
    """The URL's protocol: ``file`` for plain paths, else the scheme (``s3``, ``memory``, ...)."""
    url = os.fspath(url)
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    return "file" if scheme == "local" else ("s3" if scheme == "s3a" else scheme)


def is_local(url: str) -> bool:
    """True for plain paths, ``file://`` and ``local://`` URLs (the three spellings of one local path)."""
    return protocol_of(url) == "file"


def local_path(url: str) -> str:
    """The absolute local path (``~`` expanded, symlinks resolved) of a local URL.

    Raises:
        ValueError: ``url`` is not local (``s3://``, ``memory://``, ...).
    """
    from pathlib import Path

    url = os.fspath(url)
    if not is_local(url):
        raise ValueError(f"{url!r} is not a local path (protocol {protocol_of(url)!r})")
    return str(Path(url.split("://", 1)[1] if "://" in url else url).expanduser().resolve())


def scheme_prefix(url: str) -> str:
    """What to put before an fsspec path of ``url``'s filesystem to get a URL again: ``""`` locally, else
    ``"<scheme>://"`` (fsspec paths of object stores carry no scheme)."""
    url = os.fspath(url)
    return "" if is_local(url) else url.split("://", 1)[0] + "://"


def glob(url_pattern: str, storage_options: dict | None = None) -> list[str]:
    """The URLs matching a glob pattern under any filesystem, sorted (``<root>/runs/diffusion/*``)."""
    fs, pattern = url_to_fs(url_pattern, storage_options)
    prefix = scheme_prefix(url_pattern)
    if prefix and not os.fspath(url_pattern).split("://", 1)[1].startswith("/"):
        return sorted(prefix + p.lstrip("/") for p in fs.glob(pattern))  # memory:// paths come back as "/x/..."
    return sorted(prefix + p for p in fs.glob(pattern))


def _options(url: str, storage_options: dict | None) -> dict:
    """Fill in defaults per protocol: the S3 endpoint from ``AWS_ENDPOINT_URL`` when the options name none."""
    opts = dict(storage_options or {})
    if protocol_of(url) == "s3":
        from .retries import install

        install()  # count retried requests (storage/retries.py) in every S3 client made from here on
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
            opts["endpoint_url"] = endpoint
    return opts


def _check_protocol(url: str) -> None:
    proto = protocol_of(url)
    if proto not in _KNOWN:
        import fsspec

        if proto not in fsspec.available_protocols():
            raise ValueError(f"unsupported storage URL {url!r}: protocol {proto!r} is not one of {_KNOWN} "
                             "nor a registered fsspec protocol")


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """Turn a URL (plain path, ``file://``, ``s3://``, ``memory://``) into ``(fsspec filesystem, path)``.

    Args:
        url: the location.
        storage_options: fsspec options (keys, ``endpoint_url``, ...); the S3 endpoint defaults to
            ``$AWS_ENDPOINT_URL``.

    Raises:
        ValueError: for an empty URL or an unknown protocol.
    """
    import fsspec

    url = os.fspath(url)
    if not url:
        raise ValueError("storage URL is empty")
    _check_protocol(url)
    if is_local(url):
        fs = fsspec.filesystem("file", **(storage_options or {}))
        path = url.split("://", 1)[1] if "://" in url else url
        return fs, os.path.abspath(os.path.expanduser(path))
    return fsspec.core.url_to_fs(url, **_options(url, storage_options))


def zarr_store(url: str, storage_options: dict | None = None, read_only: bool = False):
    """A Zarr v3 store for ``url``: ``LocalStore`` for local paths, ``FsspecStore`` otherwise.

    ``memory://`` uses fsspec's process-wide memory filesystem (not a private ``MemoryStore``) so that fsspec
    calls (markers, listings) and Zarr see the same objects.
    """
    from zarr.storage import FsspecStore, LocalStore

    url = os.fspath(url)
    _check_protocol(url)
    if is_local(url):
        fs, path = url_to_fs(url)
        if not read_only:
            fs.makedirs(path, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    opts = _options(url, storage_options)
    return FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/`` (keeps the scheme; strips duplicate slashes at the seams)."""
    url = os.fspath(url)
    out = url.rstrip("/") if url.rstrip("/") else url
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    return bool(fs.exists(path))


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """The whole object at ``url``."""
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def put_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see all of it or nothing.

    Object stores (S3) make a single PUT atomic; on local disk we write a temporary file and rename it.
    """
    if "file" in _protocols(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def write_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """``put_atomic`` at a URL: the one atomic write of the project (run files, metrics, JSON / npz objects)."""
    fs, path = url_to_fs(url, storage_options)
    if not is_local(url) and "/" in path.strip("/"):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on S3; memory:// lists parents it knows
    put_atomic(fs, path, data)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def mask_options(opts: dict | None) -> dict:
    """A copy of storage options safe to print: values of keys that look secret become ``'***'`` (recursively)."""
    out: dict = {}
    for k, v in (opts or {}).items():
        if isinstance(v, dict):
            out[k] = mask_options(v)
        elif any(word in str(k).lower() for word in _SECRET_WORDS):
            out[k] = "***"
        else:
            out[k] = v
    return out
