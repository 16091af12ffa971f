"""Checks that scripts/deploy_smoke.sh runs against a real Prefect server (PREFECT_API_URL), through the client.

    python scripts/deploy_checks.py wait-run FLOW_RUN_ID [--timeout S]   # exit 1 unless it ends COMPLETED
    python scripts/deploy_checks.py wait-triggered ROOT [--timeout S]    # one evaluate-checkpoint run per event
    python scripts/deploy_checks.py rows ROOT                            # print the result table's row count
    python scripts/deploy_checks.py check ROOT [--rows N]                # one row per scoring; artifacts; names
    python scripts/deploy_checks.py kill-worker FLOW_RUN_ID WORKER_PID   # SIGKILL it mid-training; must end Crashed
    python scripts/deploy_checks.py resumed FLOW_RUN_ID STEP             # the rerun resumed from >= STEP
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
)
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

EVAL_DEPLOYMENT = "evaluate-checkpoint"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _fail(msg: str) -> None:
    print(f"deploy check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def wait_run(client: Any, run_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        state = run.state.type.value if run.state else "PENDING"
        if state in FINAL:
            if state != "COMPLETED":
                _fail(f"flow run {run.name!r} ({run_id}) ended {state}: {run.state.message}")
            print(f"flow run {run.name!r}: COMPLETED")
            return
        if time.monotonic() > deadline:
            _fail(f"flow run {run.name!r} ({run_id}) still {state} after {timeout:.0f} s")
        time.sleep(2)


def checkpoint_events(client: Any, root: str) -> list[Any]:
    from prefect.types._datetime import now

    since = now("UTC") - __import__("datetime").timedelta(hours=6)
    page = client.read_events(EventFilter(event=EventNameFilter(name=["dcae15.checkpoint.saved"]),
                                          occurred=EventOccurredFilter(since=since)), limit=50)
    return [e for e in page.events if e.resource.get("dcae15.root") == root]


def eval_runs(client: Any) -> list[Any]:
    return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[EVAL_DEPLOYMENT])))


def wait_triggered(client: Any, root: str, timeout: float) -> None:
    """Every checkpoint event started one evaluate-checkpoint run (by the trigger, not by us) and each completed."""
    deadline = time.monotonic() + timeout
    while True:
        events = checkpoint_events(client, root)
        runs = eval_runs(client)
        states = [r.state.type.value if r.state else "PENDING" for r in runs]
        done = events and len(runs) >= len(events) and all(s in FINAL for s in states)
        if done or time.monotonic() > deadline:
            break
        time.sleep(3)
    if not events:
        _fail("no dcae15.checkpoint.saved event reached the server")
    steps = sorted(int(e.resource["dcae15.step"]) for e in events)
    print(f"checkpoint events: steps {steps}; evaluate-checkpoint runs: "
          + ", ".join(f"{r.name!r} {s}" for r, s in zip(runs, states)))
    if len(runs) != len(events):
        _fail(f"{len(events)} checkpoint events but {len(runs)} evaluate-checkpoint runs")
    bad = [(r.name, s, r.state.message if r.state else "") for r, s in zip(runs, states) if s != "COMPLETED"]
    if bad:
        _fail(f"evaluate-checkpoint runs not completed: {bad}")
    if sorted(int(r.parameters["step"]) for r in runs) != steps:
        _fail(f"triggered runs' steps {[r.parameters['step'] for r in runs]} != event steps {steps}")


def rows(root: str) -> int:
    from dcae15.metrics.results import read_results

    return len(read_results(f"{root}/eval/results"))


def check(client: Any, root: str, expect_rows: int | None) -> None:
    from dcae15.metrics.results import format_table, read_results

    table = read_results(f"{root}/eval/results")
    print(format_table(table))
    if expect_rows is not None and len(table) != expect_rows:
        _fail(f"the sweep changed the results table: {expect_rows} rows before, {len(table)} after")
    count = collections.Counter((r["run_id"], r["step"], r["feature_extractor"], r["metric"]) for r in table.rows())
    dup = {k: n for k, n in count.items() if n > 1}
    if dup:
        _fail(f"checkpoints scored more than once: {dup}")
    from dcae15.diffusion.checkpoint import list_checkpoints

    scored = {(r["run_id"], int(r["step"])) for r in table.rows()}
    for e in checkpoint_events(client, root):
        key = (e.resource["prefect.resource.name"], int(e.resource["dcae15.step"]))
        if key not in scored and key[1] in list_checkpoints(e.resource["dcae15.run-url"]):
            _fail(f"checkpoint {key} announced by an event has no result row")  # pruned ones are skipped
    print(f"result rows: {len(table)}, one per (run, step, extractor, metric); scored checkpoints: {sorted(scored)}")

    arts = client.read_artifacts(limit=200)
    keys = {a.key for a in arts if a.key}
    kinds = {"metrics table": r"^metrics-", "training progress": r"^progress-train-",
             "encoding progress": r"^progress-encode-", "sampling progress": r"^progress-sample-",
             "reference progress": r"^progress-reference-", "training outputs": r"^train-",
             "store outputs": r"^encode-", "figure link": r"^figure-"}
    missing = [k for k, pat in kinds.items() if not any(re.match(pat, key) for key in keys)]
    if missing:
        _fail(f"artifacts missing: {missing}; present keys: {sorted(keys)}")
    tables = [a for a in arts if a.type == "table" and a.key and a.key.startswith("metrics-")]
    if not any("proxy-classifier_accuracy" in str(a.data) for a in tables):
        _fail("no metrics table carries the proxy classifier's accuracy")
    print(f"artifacts: {len(keys)} keys, e.g. {sorted(keys)[:6]}")

    names = [r.name for r in client.read_flow_runs(limit=200)]
    ours = re.compile(r"^(pipeline |prepare |train |encode |sample |evaluate )")
    random_names = [n for n in names if not ours.match(n)]
    if random_names:
        _fail(f"flow runs without a descriptive name: {random_names}")
    print(f"flow-run names: {sorted(set(names))[:8]} ...")


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first found first."""
    import os

    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_worker(client: Any, run_id: str, worker_pid: int, timeout: float) -> None:
    """Wait until the flow run trains past its first checkpoint, SIGKILL the worker and every process under it (a lost
    node), then wait for the run to leave Running: the zombie automation must mark it Crashed."""
    import os
    import signal

    deadline = time.monotonic() + 600
    step = None
    while step is None:
        events = [e for e in client.read_events(EventFilter(event=EventNameFilter(name=["dcae15.checkpoint.saved"])),
                                                limit=50).events
                  if any(r.id == f"prefect.flow-run.{run_id}" for r in e.related)]
        if events:
            step = max(int(e.resource["dcae15.step"]) for e in events)
        elif time.monotonic() > deadline:
            _fail(f"flow run {run_id} committed no checkpoint in 600 s")
        else:
            time.sleep(1)
    state = client.read_flow_run(run_id).state.type.value
    if state != "RUNNING":
        _fail(f"flow run {run_id} is {state} before the kill: make the training longer")
    victims = [worker_pid, *_descendants(worker_pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t_kill = time.monotonic()
    print(f"checkpoint step {step} committed; SIGKILLed the worker and its {len(victims) - 1} child processes")
    while True:
        run = client.read_flow_run(run_id)
        if run.state.type.value != "RUNNING":
            break
        if time.monotonic() - t_kill > timeout:
            _fail(f"flow run {run_id} still Running {timeout:.0f} s after its worker was killed")
        time.sleep(2)
    waited = time.monotonic() - t_kill
    print(f"flow run {run.name!r} left Running {waited:.0f} s after the kill: {run.state.type.value} "
          f"({run.state.message})")
    if run.state.type.value != "CRASHED":
        _fail(f"expected CRASHED, got {run.state.type.value}")


def resumed(client: Any, run_id: str, step: int) -> None:
    """The rerun's log says it resumed from a checkpoint at or after ``step`` (the one committed before the kill)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    hits = [re.search(r"resuming from its checkpoint at step (\d+)", log.message) for log in logs]
    steps = [int(h.group(1)) for h in hits if h]
    if not steps or steps[0] < step:
        _fail(f"the rerun {run_id} did not resume from step >= {step} (log lines: {steps})")
    print(f"the rerun resumed from step {steps[0]} (>= {step}, committed before the kill)")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("wait-run")
    a.add_argument("run_id")
    a.add_argument("--timeout", type=float, default=900)
    a = sub.add_parser("wait-triggered")
    a.add_argument("root")
    a.add_argument("--timeout", type=float, default=600)
    a = sub.add_parser("kill-worker")
    a.add_argument("run_id")
    a.add_argument("worker_pid", type=int)
    a.add_argument("--timeout", type=float, default=240)
    a = sub.add_parser("resumed")
    a.add_argument("run_id")
    a.add_argument("step", type=int)
    a = sub.add_parser("rows")
    a.add_argument("root")
    a = sub.add_parser("check")
    a.add_argument("root")
    a.add_argument("--rows", type=int, default=None)
    args = p.parse_args()
    if args.cmd == "rows":
        print(rows(args.root))
        return
    with get_client(sync_client=True) as client:
        if args.cmd == "wait-run":
            wait_run(client, args.run_id, args.timeout)
        elif args.cmd == "wait-triggered":
            wait_triggered(client, args.root, args.timeout)
        elif args.cmd == "kill-worker":
            kill_worker(client, args.run_id, args.worker_pid, args.timeout)
        elif args.cmd == "resumed":
            resumed(client, args.run_id, args.step)
        else:
            check(client, args.root, args.rows)


if __name__ == "__main__":
    main()
