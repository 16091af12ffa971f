"""Fixtures for the flow tests: one Prefect test server for the session, with its own result storage."""

from __future__ import annotations

import os
import tempfile

# Prefect reads its settings when imported: point its home and result storage at this session's temp dir first.
_SESSION_DIR = tempfile.mkdtemp(prefix="dcae15-flows-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_SESSION_DIR, "prefect-home"))
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_SESSION_DIR, "results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    """A session-scoped Prefect test server (temporary database); yields its API URL for child processes."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture
def results_dir(tmp_path):
    """A fresh result-storage directory (so cache hits come only from this test's own runs)."""
    d = tmp_path / "prefect-results"
    d.mkdir()
    return d
