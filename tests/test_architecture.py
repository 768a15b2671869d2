"""Imports run one way between Atelier's packages (checked by parsing every module's imports,
the ones inside functions included):

    storage  <-  policies  <-  nodes  <-  agent_graph  <-  training  <-  atelier

A package may import itself and the packages to its left, never one to its right: the store
knows no graph, nodes know no runner, nothing below the facade imports ``atelier`` (the
user-facing names and the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["storage", "policies", "nodes", "agent_graph", "training", "atelier"]
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of one of the layers in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in RANK]
    return found


def upward_imports() -> list[str]:
    problems = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if RANK[target] > RANK[package]:
                    where = f"{path.relative_to(ROOT)}:{line}"
                    problems.append(f"{where} imports {target} (above {package})")
    return problems


def test_no_package_imports_one_above_it():
    assert upward_imports() == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import storage.store\n"
        "def f():\n"
        "    from agent_graph.runner import Runner\n"
        "    import training.cli as t\n"
        "from . import sibling\n"
    )
    assert imported_packages(module) == [(1, "storage"), (3, "agent_graph"), (4, "training")]


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "tools"}
    assert packages == set(LAYERS)


def test_import_atelier_gives_the_public_names_lazily():
    import subprocess
    import sys

    code = (
        "import sys, atelier\n"
        "assert 'torch' not in sys.modules and 'langgraph' not in sys.modules\n"
        "print(' '.join(atelier.__all__))\n"
        "print(atelier.TrajectoryStore.__module__, atelier.AtelierGraph.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    names, modules = done.stdout.splitlines()
    assert {"AtelierGraph", "Runner", "rollout", "TrajectoryStore", "GRPOTrainer"} <= set(
        names.split()
    )
    assert modules == "storage.store agent_graph.graph"
    import atelier

    assert atelier.__all__ == sorted(atelier._EXPORTS)
    for name in atelier.__all__:
        assert getattr(atelier, name) is not None
