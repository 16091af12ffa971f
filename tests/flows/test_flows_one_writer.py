"""One writer per artifact in flow runs (flows/claims.py): two flow runs of one artifact on one Prefect API never
write at once — the second waits in the artifact's concurrency slot / storage lease — and a refusal is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

FLOW = textwrap.dedent("""
    import json, sys, time
    from prefect import flow, task
    from flows.claims import ArtifactKey, artifact_stage

    @task
    @artifact_stage(lambda url, hold: ArtifactKey("test artifact", url, "abc123"))
    def write(url, hold):
        t0 = time.time()
        time.sleep(hold)
        return [t0, time.time()]

    @flow
    def two_writers(url: str, hold: float):
        return write(url, hold)

    print("RESULT " + json.dumps(two_writers(sys.argv[1], float(sys.argv[2]))), flush=True)
""")


def test_two_flow_runs_of_one_artifact_write_one_after_the_other(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.claims import artifact_limit_name

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": os.getcwd(), "PREFECT_LOGGING_LEVEL": "INFO",
           "DCAE15_SLOT_WAIT_SECONDS": "60"}
    art = str(tmp_path / "artifacts" / "one")
    procs = [subprocess.Popen([sys.executable, "-c", FLOW, art, "3"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    (a0, a1), (b0, b1) = sorted(json.loads(log.strip().splitlines()[-1].removeprefix("RESULT ")) for log in logs)
    assert a1 <= b0, logs  # never both inside the body
    assert sum("waiting: another flow run holds the Prefect slot of test artifact abc123" in log for log in logs) == 1
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(artifact_limit_name("test artifact", "abc123"))
    assert limit.limit == 1 and limit.active_slots == 0
