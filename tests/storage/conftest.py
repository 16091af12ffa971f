"""Storage test fixtures: the same suite runs on memory://, a local directory and s3:// (loopback moto)."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(params=["memory", "local", "s3"])
def backend_url(request, tmp_path):
    """A fresh, empty root URL on each backend."""
    if request.param == "memory":
        url = f"memory://test-{uuid.uuid4().hex[:10]}"
        yield url
        import fsspec

        fsspec.filesystem("memory").rm(url.split("://", 1)[1], recursive=True)
    elif request.param == "local":
        yield str(tmp_path / "root")
    else:
        server = request.getfixturevalue("s3_server")
        yield server.make_bucket() + "/root"
