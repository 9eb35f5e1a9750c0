"""The package's layers: no import circle, and nothing imports a CLI (a module run with `python -m`).

Every `import`/`from ... import` in biomass/, at module level or inside a function, is an edge from its module to
the most specific biomass module it names. A CLI is a module with an `if __name__ == "__main__":` block: a
`__main__.py` of a package, or a top-level CLI module (`biomass.run`, `biomass.infer`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "biomass"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_cli(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) and "__main__" in ast.unparse(n.test)
               for n in tree.body)


def imports(path: Path, known: set[str]) -> set[str]:
    """The biomass modules `path` imports (resolved to the most specific known module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("biomass") and name != "biomass":
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def test_there_are_modules_and_clis():
    mods = modules()
    clis = {n for n, p in mods.items() if is_cli(p)}
    assert {"biomass.run", "biomass.infer", "biomass.ablate.__main__", "biomass.bench.__main__"} <= clis


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_nothing_imports_a_cli():
    mods = modules()
    clis = {n for n, p in mods.items() if is_cli(p)}
    offenders = [(m, t) for m, targets in graph().items() for t in targets if t in clis and m != t]
    assert not offenders, f"CLI modules imported by library code: {offenders}"


def test_the_registry_imports_no_component_and_models_no_config():
    g = graph()
    assert g["biomass.registry"] <= {"biomass.errors"}
    for name, targets in g.items():
        if name.startswith("biomass.models"):
            assert not any(t.startswith("biomass.config") for t in targets), (name, targets)


def test_a_detected_circle_fails(tmp_path):
    """The circle check can fail: two modules importing each other are caught."""
    pkg = tmp_path / "biomass"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from biomass.b import x\n")
    (pkg / "b.py").write_text("def f():\n    import biomass.a\n")
    global PACKAGE
    saved = PACKAGE
    PACKAGE = pkg
    try:
        with pytest.raises(pytest.fail.Exception, match="import circle"):
            test_no_import_circles()
    finally:
        PACKAGE = saved


def test_importing_biomass_turns_off_what_calls_out():
    """Offline by default: albumentations' update check and MLflow's telemetry (whose thread also raced other
    threads over os.environ and killed a sweep child) are off once biomass is imported, in a clean process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE")}
    code = ("import biomass, os; from mlflow.telemetry.utils import is_telemetry_disabled; "
            "print(is_telemetry_disabled(), os.environ['NO_ALBUMENTATIONS_UPDATE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "1"]
