"""Issue 24: a user's own Prefect flow, then the project's reader with forked DataLoader workers — the workers must
not die at exit (storage/forksafe.py), with no flows/ module imported; without the fix the same script fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# exactly the script: a flow of the user's own, then DataLoader(LatentStreamDataset(url, ...), ...)
SCRIPT = textwrap.dedent("""
    import sys
    from prefect import flow

    @flow
    def hello():
        return "hello"

    hello()

    from torch.utils.data import DataLoader
    import storage.reader
    from storage.reader import LatentStreamDataset

    if sys.argv[2] == "unfixed":  # the same script with the library's worker-side fix switched off
        storage.reader.in_worker = lambda: None
    loader = DataLoader(LatentStreamDataset(sys.argv[1], batch_size=8, infinite=False), batch_size=None,
                        num_workers=2)
    print("rows", sum(len(b["labels"]) for b in loader), flush=True)
    assert "flows" not in sys.modules and "flows.forksafe" not in sys.modules
""")


def _store(url: str) -> str:
    from storage.latent_store import LatentStore

    st = LatentStore.create(url, num_samples=64, channels=4, height=2, width=2, flip=False, chunk_size=16,
                            attrs={"ae_fingerprint": "ae", "dataset_fingerprint": "ds", "resolution": 16})
    for u in range(st.num_units):
        a, b = st.unit_bounds(u)
        st.write_unit(u, np.ones((b - a, 4, 2, 2), np.float16), np.arange(a, b) % 4, np.ones(b - a, bool))
    st.finalize()
    return url


def _run(store: str, mode: str, api: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}  # a user's default: the flow's log lines start the API log worker
    return subprocess.run([sys.executable, "-c", SCRIPT, store, mode], env=env, capture_output=True, text=True,
                          timeout=240)


def test_user_flow_then_reader_with_forked_workers(prefect_api, tmp_path):
    store = _store(str(tmp_path / "store"))
    fixed = _run(store, "fixed", prefect_api)
    assert fixed.returncode == 0 and "rows 64" in fixed.stdout, fixed.stdout + fixed.stderr
    unfixed = _run(store, "unfixed", prefect_api)  # the test can fail: without the fix the workers die
    assert unfixed.returncode != 0 and "exited unexpectedly with exit code 1" in unfixed.stderr, unfixed.stderr[-2000:]
