"""flows/ is wiring with flat floors: stage modules never import each other (their inputs' pointers come from
flows/pointers.py), no flow is named like its module, and prefect.yaml's entrypoints name flows that exist."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

FLOWS = Path(__file__).resolve().parents[2] / "flows"
STAGES = {"prepare", "autoencoder", "encode", "diffusion", "sample", "evaluate"}
COMPOSITIONS = {"pipeline", "score_checkpoints", "cli"}


def _imports(module: str) -> set[str]:
    """flows.* modules imported anywhere in ``module`` (module level or inside functions)."""
    tree = ast.parse((FLOWS / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "flows":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flows."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("flows.")}
    return out


def _longest_chain(module: str, seen: tuple[str, ...] = ()) -> int:
    if module in seen:
        raise AssertionError(f"import loop in flows/: {' -> '.join(seen + (module,))}")
    return 1 + max((_longest_chain(m, seen + (module,)) for m in _imports(module) if (FLOWS / f"{m}.py").exists()),
                   default=0)


def test_stage_modules_never_import_each_other_or_the_compositions():
    for stage in STAGES:
        assert not _imports(stage) & (STAGES | COMPOSITIONS), (stage, _imports(stage) & (STAGES | COMPOSITIONS))


def test_module_level_floors_stay_low():
    """Module-level imports only (what importing a module costs): was 8 modules deep (pipeline -> sample ->
    diffusion -> encode -> autoencoder -> prepare -> common -> env), 4 after issue 14."""
    def top(module: str) -> set[str]:
        tree = ast.parse((FLOWS / f"{module}.py").read_text())
        return {n.module.split(".")[1] for n in tree.body if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("flows.")}

    def depth(module: str) -> int:
        return 1 + max((depth(m) for m in top(module)), default=0)

    assert max(depth(p.stem) for p in FLOWS.glob("*.py") if p.stem != "__init__") <= 4
    assert _longest_chain("cli") <= 9  # with function-level imports (was 14); no loop either


def test_no_flow_is_named_like_its_module_and_init_has_no_lazy_attributes():
    for path in FLOWS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow" for d in node.decorator_list):
                names = {node.name} | {k.value.value for d in node.decorator_list if isinstance(d, ast.Call)
                                       for k in d.keywords if k.arg == "name"}
                assert path.stem not in names, (path.name, names)
                assert names == {node.name}, f"{path.name}: the Prefect name of {node.name} differs: {names}"
    assert "__getattr__" not in (FLOWS / "__init__.py").read_text()


def test_prefect_yaml_entrypoints_name_existing_flows():
    conf = yaml.safe_load((FLOWS.parent / "prefect.yaml").read_text())
    for dep in conf["deployments"]:
        path, func = dep["entrypoint"].split(":")
        tree = ast.parse((FLOWS.parent / path).read_text())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, dep["entrypoint"]


def test_configs_have_one_source_the_packaged_presets():
    """configs/ (what README points at) is the package's own folder, not a copy that could drift."""
    from flows.config import CONFIG_DIR, preset_names

    assert (FLOWS.parent / "configs").resolve() == CONFIG_DIR.resolve() == (FLOWS / "configs").resolve()
    assert {"demo", "tiny", "imagenet"} <= set(preset_names())
