"""Rerun cost: a cached rerun of ``dcae15 demo`` against its first run, measured in the same run (goal <= 3 %).

Three fresh ``dcae15`` processes on one root, as a user would type them (no PREFECT_API_URL):
  1. the first run (everything computed);
  2. the rerun (default): every stage's pointer re-validated, Prefect not started (flows/rerun.py);
  3. the rerun ``--through-prefect``: the old path, every stage returned from Prefect's cache via a temporary server.

    .venv/bin/python bench/rerun.py                       # the demo config (~7-12 min on 2 shared cores)
    .venv/bin/python bench/rerun.py --config tiny         # seconds-sized config, same code path
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--root", default=None, help="default: a fresh temporary directory (removed afterwards)")
    args = p.parse_args()
    tmp = None if args.root else tempfile.mkdtemp(prefix="dcae15-rerun-")
    root = Path(args.root or tmp) / "root"
    log = Path(args.root or tmp) / "bench.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = ["demo", "--config", args.config, "--root", str(root)]
    try:
        first = timed(cmd, env, log)
        rerun = timed(cmd, env, log)
        through = timed([*cmd, "--through-prefect"], env, log)
    finally:
        if "not starting Prefect" not in log.read_text():
            print(f"the rerun did not take the shortcut; see {log}")
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"config {args.config}: first run {first:.1f} s")
    print(f"rerun (pointers checked, no Prefect):     {rerun:6.1f} s = {100 * rerun / first:5.2f} % of the first run")
    print(f"rerun --through-prefect (cached tasks):   {through:6.1f} s = {100 * through / first:5.2f} % of the first run")
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
