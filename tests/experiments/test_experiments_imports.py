"""experiments/ has no import circle: the channel sweep's runner and its report share experiments/channels_plan.py
and never import each other (imports anywhere in a module count, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _imports(module: str) -> set[str]:
    """experiments.* modules that ``module`` imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse((EXPERIMENTS / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "experiments":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("experiments.")}
    return {m for m in out if (EXPERIMENTS / f"{m}.py").exists()}


def test_no_import_circle_in_experiments():
    graph = {p.stem: _imports(p.stem) for p in EXPERIMENTS.glob("*.py") if p.stem != "__init__"}

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import circle: " + " -> ".join((*path, module))
        for dep in graph[module]:
            visit(dep, (*path, module))

    for module in graph:
        visit(module, ())
    assert "channels" not in graph["channels_report"] and "channels_report" not in graph["channels_plan"]
