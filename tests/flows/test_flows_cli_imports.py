"""``dcae15 --help`` and ``dcae15 results`` stay fast: building the CLI's parser imports no torch, Prefect or Zarr
(a deterministic stand-in for their start-up time: torch alone takes seconds to import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "prefect", "zarr", "dask", "torchvision", "torch_fidelity", "diffusers")


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    probe = code + f"\nimport json, sys; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_building_the_parser_imports_no_heavy_module():
    assert _modules_after("import flows.cli; flows.cli.build_parser()") == set()


def test_results_of_an_empty_root_imports_no_heavy_module(tmp_path):
    code = f"import flows.cli; flows.cli.main(['results', '--root', {str(tmp_path)!r}])"
    assert _modules_after(code) == set()
