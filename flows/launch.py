"""Run a training job in a child process (``torchrun`` for several processes / nodes) and stream its log.

Several nodes: every node runs the same ``torchrun --nnodes N`` command with a c10d rendezvous (``--rdzv-backend
c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB``): the rendezvous assigns node ranks, so no per-node argument is
needed. Who starts the per-node commands is ``node_launcher``: ``srun`` (one task per node of a SLURM allocation,
``--kill-on-bad-exit``), ``local`` (N agents on this machine: two "nodes" on loopback in tests and rehearsals), or
``self`` (this flow run is one of the nodes: one Prefect flow run or Kubernetes indexed-Job pod per node, all
pointed at the same endpoint)."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

__all__ = ["LaunchError", "NODE_LAUNCHERS", "torchrun_command", "rendezvous_args", "node_commands", "run_streaming",
           "run_local_nodes", "write_launch_file", "in_process", "run_torchrun"]

NODE_LAUNCHERS = ("self", "local", "srun")
DEFAULT_RDZV_PORT = 29500


class LaunchError(RuntimeError):
    """The child exited non-zero; the message holds its exit status and its last log lines."""


def torchrun_command(
    module: str,
    module_args: Sequence[str],
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """The argv that runs ``python -m module`` under ``torch.distributed.run`` (the module behind ``torchrun``).

    Args:
        module: e.g. ``dcae15.diffusion.train``.
        module_args: arguments of the module.
        nproc_per_node: processes per node (GPUs per node).
        nnodes: number of nodes; multi-node runs also need rendezvous arguments in ``extra``
            (``--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB``, or ``--node-rank`` + ``--master-addr``).
        extra: further torchrun arguments, passed through unchanged.
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"nproc_per_node and nnodes must be >= 1, got {nproc_per_node}, {nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1 and not any(a.startswith(("--rdzv", "--master", "--standalone")) for a in extra):
        cmd.append("--standalone")  # single node: torchrun picks a free port itself
    return [*cmd, *extra, "-m", module, *module_args]


def run_streaming(
    cmd: Sequence[str],
    *,
    log: Callable[[str], None],
    tail: int = 40,
    env: dict[str, str] | None = None,
    cpus: Sequence[int] | None = None,
) -> None:
    """Run ``cmd``, passing every output line to ``log`` as it arrives; raise with the last ``tail`` lines on failure.

    ``cpus``: pin the child to these cores (Linux; set right after it starts, before torchrun spawns its workers,
    which inherit it). Elsewhere the child's ``OMP_NUM_THREADS`` (in ``env``) is the only bound.

    Raises:
        LaunchError: the child exited with a non-zero status (or was killed by a signal).
    """
    last: collections.deque[str] = collections.deque(maxlen=tail)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # A piped tqdm bar turns every refresh (10 a second) into a line, each one a Prefect log record sent to the
    # API: two demo trainers sent ~20 a second. One refresh per 5 s unless the caller sets its own.
    child_env.setdefault("TQDM_MININTERVAL", "5")
    with subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=child_env
    ) as proc:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(proc.pid, set(cpus))
        try:
            for line in proc.stdout or ():
                line = line.rstrip("\n")
                last.append(line)
                log(line)
        except BaseException:
            proc.kill()  # the flow was cancelled or crashed: do not leave the trainer running
            raise
        code = proc.wait()
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        lines = "\n".join(last)
        raise LaunchError(f"{cmd[0]} ... {' '.join(cmd[-3:])} failed with {how}. Last output lines:\n{lines}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_args(launch: dict, rdzv_id: str) -> list[str]:
    """The c10d rendezvous arguments of a multi-node launch (none for one node or when ``torchrun_args`` already
    name a rendezvous / master address).

    The endpoint is ``launch["rdzv_endpoint"]``, else: ``local`` 127.0.0.1 on a free port; ``srun`` this host (the
    allocation's first node, where the batch script and the flow run) on port 29500.

    Raises:
        ValueError: ``self`` on several nodes without an endpoint (nobody else could find the rendezvous).
    """
    if launch["nnodes"] == 1 or any(a.startswith(("--rdzv", "--master")) for a in launch["torchrun_args"]):
        return []
    how = launch.get("node_launcher", "self")
    endpoint = launch.get("rdzv_endpoint")
    if endpoint is None:
        if how == "self":
            raise ValueError("nnodes > 1 with node_launcher 'self' needs rdzv_endpoint: HOST:PORT (the same on every "
                             "node), or node_launcher 'srun' / 'local'")
        endpoint = f"127.0.0.1:{_free_port()}" if how == "local" else f"{socket.gethostname()}:{DEFAULT_RDZV_PORT}"
    return ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}"]


def node_commands(launch: dict, module: str, module_args: Sequence[str], *, rdzv_id: str) -> list[list[str]]:
    """What runs: one argv per node for ``local``; one argv for ``self`` (this node) and ``srun`` (srun starting
    the same torchrun command on every node of the allocation)."""
    how = launch.get("node_launcher", "self")
    if how not in NODE_LAUNCHERS:
        raise ValueError(f"node_launcher={how!r}; allowed: {', '.join(NODE_LAUNCHERS)}")
    extra = [*rendezvous_args(launch, rdzv_id), *launch["torchrun_args"]]
    cmd = torchrun_command(module, module_args, nproc_per_node=launch["nproc_per_node"], nnodes=launch["nnodes"],
                           extra=extra)
    if launch["nnodes"] == 1 or how == "self":
        return [cmd]
    if how == "srun":  # one task per node; a node that dies ends the step on every node (the flow retries it)
        return [["srun", f"--nodes={launch['nnodes']}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *cmd]]
    return [cmd] * launch["nnodes"]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_local_nodes(cmds: Sequence[Sequence[str]], *, log: Callable[[str], None], tail: int = 40,
                    env: dict[str, str] | None = None) -> None:
    """Start one node's agent per argv on this machine, each in its own process group (``DCAE15_NODE=i`` in its
    environment), with every line logged as ``[node i] ...``. When one node fails, the others are killed (their
    collectives would wait for it until a timeout) and the launch fails; a rerun resumes from the checkpoint.

    Raises:
        LaunchError: a node exited non-zero or was killed; the message holds the last lines of all nodes.
    """
    last: collections.deque[str] = collections.deque(maxlen=tail)
    procs: list[subprocess.Popen] = []

    def pump(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout or ():
            line = f"[node {i}] {line.rstrip()}"
            last.append(line)
            log(line)

    try:
        for i, cmd in enumerate(cmds):
            child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), "DCAE15_NODE": str(i)}
            procs.append(subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          bufsize=1, env=child_env, start_new_session=True))
        pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in pumps:
            t.start()
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except BaseException:
        for p in procs:  # the flow was cancelled or crashed: leave no node running
            _kill_group(p)
        raise
    if bad:
        for p in procs:
            _kill_group(p)
    for p in procs:
        p.wait()
    for t in pumps:
        t.join(timeout=5)
    if bad:
        i, code = bad[0]
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        lines = "\n".join(last)
        raise LaunchError(f"node {i} of {len(procs)} failed with {how}; the other nodes were stopped. "
                          f"Last output lines:\n{lines}")


def write_launch_file(run_url: str, payload: dict) -> str:
    """Write ``<run_url>/launch.yaml`` (what ``--config`` reads under torchrun) and return its URL.

    One run file instead of options: torchrun's own parser would take a trainer's ``--store`` / ``--run`` for its
    abbreviated options.
    """
    import yaml

    from storage.urls import join, write_atomic

    url = join(run_url, "launch.yaml")
    write_atomic(url, yaml.safe_dump(payload, sort_keys=False).encode())
    return url


def in_process(launch: dict) -> bool:
    """Whether a stage's job runs in the flow's own process: ``launcher: inprocess``, or ``auto`` with one process
    in all (``launch``: ``launcher``, ``nproc_per_node``, ``nnodes``, ``torchrun_args``); else under torchrun."""
    return launch["launcher"] == "inprocess" or (
        launch["launcher"] == "auto" and launch["nproc_per_node"] * launch["nnodes"] == 1)


def run_torchrun(launch: dict, module: str, module_args: Sequence[str], *, log: Callable[[str], None]) -> None:
    """``python -m module module_args`` under torchrun as ``launch`` says (processes per node, nodes, who starts
    each node's command: see the module docstring), its output streamed to ``log``; a job slot's ``launch``
    (flows/machine.py) adds ``env`` (its GPUs, threads) and ``cpus`` (its cores)."""
    from storage.fingerprint import short_id

    cmds = node_commands(launch, module, module_args, rdzv_id=short_id(module, list(module_args)))
    where = (f" on cores {launch['cpus']}" if launch.get("cpus") else "") + "".join(
        f" {k}={v}" for k, v in launch.get("env", {}).items())
    log("launching " + " ".join(cmds[0]) + (f" on {len(cmds)} local nodes" if len(cmds) > 1 else "") + where)
    if len(cmds) > 1:
        run_local_nodes(cmds, log=lambda line: log(f"[torchrun] {line}"))
    else:
        run_streaming(cmds[0], log=lambda line: log(f"[torchrun] {line}"), env=launch.get("env"),
                      cpus=launch.get("cpus"))
