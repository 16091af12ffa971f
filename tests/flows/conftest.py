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

    # a deadline for the server to come up, not a decision: it starts in 5-30 s, but one start beside the
    # concurrency stress loop (scripts/stress_concurrency.sh, load average 10 on 2 cores) took over 60 s
    with prefect_test_harness(server_startup_timeout=300):
        yield PREFECT_API_URL.value()


@pytest.fixture
def results_dir(tmp_path):
    """A fresh result-storage directory (so cache hits come only from this test's own runs)."""
    d = tmp_path / "prefect-results"
    d.mkdir()
    return d


def _tiny_config(root, **over):
    """The tiny preset as a dict, rooted at ``root``, with nested overrides."""
    from flows.config import load_config

    return load_config("tiny", {"root": str(root), **over}).to_dict()


def _task_states_since(t0, expect: set[str], timeout: float = 20.0) -> dict[str, list[str]]:
    """{task name: [state names]} of task runs created after ``t0``, waiting until every name in ``expect`` shows up
    (Prefect 3 records task-run states asynchronously)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)
        out: dict[str, list[str]] = {}
        for r in runs:
            if r.created and r.created >= t0 and r.state is not None and r.state.is_final():
                out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
        if expect <= set(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


@pytest.fixture
def tiny_config():
    """``tiny_config(root, **nested_overrides) -> dict``: the tiny preset rooted at ``root``."""
    return _tiny_config


@pytest.fixture
def task_states_since():
    """``task_states_since(t0, expect) -> {task name: [state names]}`` from the test server."""
    return _task_states_since
