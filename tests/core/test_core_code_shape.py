"""The code stays readable top to bottom (issue 34): no function longer than 100 lines (docstring included) in the
library (``dcae15/``, ``storage/``), its Prefect wiring and CLI (``flows/``), the experiments (``experiments/``), the
benchmarks (``bench/``) or the deployment scripts' Python (``scripts/``); split a longer one into named steps (as
``experiments/report.py::write_report`` is: one function per report section)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 100
FOLDERS = ("dcae15", "storage", "flows", "experiments", "bench", "scripts")


def test_no_function_longer_than_100_lines():
    long = []
    for folder in FOLDERS:
        paths = sorted((REPO / folder).rglob("*.py"))
        assert paths, f"{folder}/ has no Python file: the check would pass without looking"
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 100 lines: " + "; ".join(long)
