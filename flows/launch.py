"""Run a training job in a child process (``torchrun`` for several processes / nodes) and stream its log."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from typing import Callable, Sequence

__all__ = ["LaunchError", "torchrun_command", "run_streaming", "write_launch_file", "in_process", "run_torchrun"]


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
    """``python -m module module_args`` under torchrun as ``launch`` says, its output streamed to ``log``; a job
    slot's ``launch`` (flows/slots.py) adds ``env`` (its GPUs, threads) and ``cpus`` (its cores)."""
    cmd = torchrun_command(module, module_args, nproc_per_node=launch["nproc_per_node"], nnodes=launch["nnodes"],
                           extra=launch["torchrun_args"])
    where = f" on cores {launch['cpus']}" if launch.get("cpus") else ""
    log("launching " + " ".join(cmd) + where + "".join(f" {k}={v}" for k, v in launch.get("env", {}).items()))
    run_streaming(cmd, log=lambda line: log(f"[torchrun] {line}"), env=launch.get("env"), cpus=launch.get("cpus"))
