"""dcae15.metrics imports run one way: every intra-package import at module top, no cycle, the extractor a leaf."""

import ast
from pathlib import Path

import dcae15.metrics

LEAVES = {"extractor", "labels", "inputs", "_io", "lpips_offline"}  # import no other dcae15.metrics module


def _imports() -> dict[str, dict[str, bool]]:
    """module -> {imported dcae15.metrics module: whether at module top}."""
    root = Path(dcae15.metrics.__file__).parent
    names = {p.stem for p in root.glob("*.py")}
    out = {}
    for p in root.glob("*.py"):
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        deps: dict[str, bool] = {}
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module == "dcae15.metrics":
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dcae15.metrics."):
                mods = [node.module.split(".")[2]]
            elif isinstance(node, ast.Import):
                mods = [a.name.split(".")[2] for a in node.names if a.name.startswith("dcae15.metrics.")]
            for m in mods:
                if m in names and m != p.stem:
                    deps[m] = deps.get(m, True) and id(node) in top
        out[p.stem] = deps
    return out


def test_metrics_imports_are_top_level_acyclic_and_extractor_is_a_leaf():
    graph = _imports()
    lazy = sorted((a, b) for a, deps in graph.items() for b, at_top in deps.items() if not at_top)
    assert lazy == [], f"function-level imports inside dcae15.metrics (a sign of a loop): {lazy}"
    for leaf in LEAVES:
        assert set(graph[leaf]) <= {"_io"}, f"{leaf} must stay a leaf, imports {sorted(graph[leaf])}"
    state: dict[str, str] = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in graph.get(m, {}):
            visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])
