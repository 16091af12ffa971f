"""Apply dcae15's operational objects to a Prefect server (PREFECT_API_URL), idempotently, through Prefect's API.

    python deploy/apply.py                                   # automations + this machine's GPU slot
    python deploy/apply.py --gpu-host gpu-01 --gpu-host gpu-02 --gpu-tag-limit 2
    python deploy/apply.py --gpu-pool dcae15-gpu             # + the Kubernetes GPU work pool (deploy/gpu-work-pool.yaml)

What it creates (re-running replaces, never duplicates):
- the automations of deploy/automations.yaml (the zombie-run detector), replacing those of the same name;
- one global concurrency limit ``dcae15-gpu-<host>`` (limit ``--gpu-slots``, default 1) per GPU machine: GPU stages
  hold a slot of their machine's limit (flows/machine.py), so two trainings never share a machine's GPUs;
- optionally a tag concurrency limit on ``gpu``-tagged task runs (all GPU stages) across the whole server;
- optionally the Kubernetes GPU work pool from deploy/gpu-work-pool.yaml.
The ``prefect deploy --all`` of prefect.yaml (deployments + the evaluate-checkpoint trigger) stays a separate step.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # flows.machine, when run as a script from anywhere

__all__ = ["load_automations", "load_gpu_pool_template", "apply_automations", "apply_gpu_limits", "apply_gpu_pool",
           "main"]


def load_automations(path: Path = HERE / "automations.yaml") -> list[Any]:
    """The automations of ``path``, validated by Prefect's ``AutomationCore`` schema."""
    from prefect.events.schemas.automations import AutomationCore

    data = yaml.safe_load(path.read_text())
    return [AutomationCore.model_validate(a) for a in data["automations"]]


def load_gpu_pool_template(path: Path = HERE / "gpu-work-pool.yaml") -> dict[str, Any]:
    """The GPU base job template, validated by Prefect's work-pool schema (every placeholder declared)."""
    from prefect.client.schemas.actions import WorkPoolCreate

    template = yaml.safe_load(path.read_text())
    WorkPoolCreate(name="validate", type="kubernetes", base_job_template=template)
    return template


def apply_automations(client: Any, automations: list[Any]) -> list[str]:
    """Create each automation after deleting any of the same name; returns the ids created."""
    ids = []
    for automation in automations:
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        ids.append(str(client.create_automation(automation)))
    return ids


def apply_gpu_limits(client: Any, hosts: list[str], slots: int, tag_limit: int | None) -> list[str]:
    """One global concurrency limit per GPU host (+ the ``gpu`` tag limit when asked); returns the limit names."""
    from flows.machine import GPU_TAG, gpu_limit_name

    names = []
    for host in hosts:
        name = gpu_limit_name(host)
        client.upsert_global_concurrency_limit_by_name(name, slots)
        names.append(name)
    if tag_limit is not None:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=tag_limit)  # upserts by tag
        names.append(f"tag:{GPU_TAG}")
    return names


def apply_gpu_pool(client: Any, name: str, template: dict[str, Any]) -> str:
    """Create (or overwrite) the Kubernetes GPU work pool with the template."""
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template,
                                                  description="dcae15 GPU stages (deploy/gpu-work-pool.yaml)"),
                                   overwrite=True)
    return pool.name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-host", action="append", default=None,
                   help="a GPU machine's host name (repeatable; default: this machine)")
    p.add_argument("--gpu-slots", type=int, default=1, help="GPU jobs allowed at once per machine (default 1)")
    p.add_argument("--gpu-tag-limit", type=int, default=None,
                   help="server-wide cap on running gpu-tagged task runs (e.g. the number of GPU machines)")
    p.add_argument("--gpu-pool", default=None, help="also create this Kubernetes GPU work pool")
    p.add_argument("--no-automations", action="store_true")
    args = p.parse_args(argv)
    if args.gpu_slots < 1:
        p.error("--gpu-slots must be >= 1")

    from prefect.client.orchestration import get_client

    automations = [] if args.no_automations else load_automations()
    template = load_gpu_pool_template() if args.gpu_pool else None
    with get_client(sync_client=True) as client:
        for automation_id, a in zip(apply_automations(client, automations), automations):
            print(f"automation {a.name!r}: {automation_id}")
        for name in apply_gpu_limits(client, args.gpu_host or [socket.gethostname()], args.gpu_slots,
                                     args.gpu_tag_limit):
            print(f"concurrency limit {name}")
        if template is not None:
            print(f"work pool {apply_gpu_pool(client, args.gpu_pool, template)!r} (kubernetes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
