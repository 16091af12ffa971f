"""The library stays readable top to bottom (issue 34): no function in ``dcae15/`` or ``storage/`` longer than
100 lines (docstring included); split a longer one into named steps."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 100


def test_no_function_longer_than_100_lines():
    long = []
    for pkg in ("dcae15", "storage"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 100 lines: " + "; ".join(long)
