"""Imports run one way between Atelier's packages (checked by parsing every module's imports,
the ones inside functions included):

    storage  <-  policies  <-  nodes  <-  agent_graph  <-  training  <-  atelier

A package may import itself and the packages to its left, never one to its right: the store
knows no graph, nodes know no runner, nothing below the facade imports ``atelier`` (the
user-facing names and the command line).

Inside ``nodes.backends`` the parts are layered the same way:

    protocols (base, *_types, wire, noop, model_dirs, overrides, vlm_judge, abandon)
      <-  flow, shapeworld  <-  clients, engines  <-  servers  <-  config

so a reader knows where retries (clients), torch code (engines, flow) and HTTP servers live,
and clients and engines never import each other."""

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


BACKEND_PARTS = {"protocols": 0, "flow": 1, "shapeworld": 1, "clients": 2, "engines": 2}
BACKEND_PARTS |= {"servers": 3, "config": 4}


def backend_part(module: str) -> str:
    """The part of ``nodes.backends`` a dotted module name belongs to."""
    parts = module.split(".")[2:]
    if not parts:
        return "protocols"
    if parts[0] in BACKEND_PARTS and parts[0] != "protocols":
        return parts[0]
    return "protocols"  # a top-level module: base, lm_types, wire, ...


def backend_layer_violations() -> list[str]:
    problems = []
    root = ROOT / "nodes" / "backends"
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = backend_part(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith("nodes.backends"):
                    continue
                other = backend_part(target)
                if other != own and BACKEND_PARTS[other] >= BACKEND_PARTS[own]:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    problems.append(f"{where}: {own} imports {target} ({other})")
    return problems


def test_backend_parts_import_only_lower_parts():
    assert backend_layer_violations() == []


def test_backend_part_names():
    assert backend_part("nodes.backends.base") == "protocols"
    assert backend_part("nodes.backends.config") == "config"
    assert backend_part("nodes.backends.engines.flow_image") == "engines"
    assert backend_part("nodes.backends.shapeworld.render") == "shapeworld"


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
