"""Dependencies run one way: data below models, models below the CLI, the CLI below sweeps (DESIGN.md). Checked on
the code itself: what a fresh interpreter loads, and every import statement of the packages."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("datamodules", "lightning_modules", "scripts")
# lightning_modules' concerns from the bottom up (sub-packages, and `module`/`console` at its root; `api`: the
# other root files, which tie model, data and trainer together for a notebook): each imports only those before it
LAYERS = ("console", "backbones", "finetuning", "speed", "module", "reporting", "api", "cli", "sweeps")


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _name(path: Path) -> str:
    """The dotted module name of a file of the packages."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def _project_imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, inside a function) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text())
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(node, n, id(node) in inside) for n in names if n.split(".")[0] in PACKAGES]
    return found


@pytest.mark.slow
def test_the_data_package_loads_without_the_models() -> None:
    modules = [_name(p) for p in _modules("datamodules") if p.stem != "__init__"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning_modules'))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert len(modules) >= 10 and loaded.stdout.strip() == "[]", loaded.stdout


def test_no_import_inside_a_function_dodges_a_cycle() -> None:
    late = [
        f"{path.relative_to(REPO)}:{node.lineno} {name}"  # type: ignore[attr-defined]
        for package in PACKAGES
        for path in _modules(package)
        for node, name, inside in _project_imports(path)
        if inside
    ]
    assert late == []


def _layer(module: str) -> int:
    """The module's place in `LAYERS`: its sub-package, or its own name for a file at the package root."""
    parts = module.split(".")
    return (
        LAYERS.index(parts[1] if len(parts) > 2 or parts[1] in LAYERS else "api") if parts[0] != "datamodules" else -1
    )


def test_imports_run_one_way() -> None:
    """Each concern imports only those below it in `LAYERS` (and the data package); sub-packages hold no cycle."""
    graph: dict[str, set[str]] = {}
    for package in ("datamodules", "lightning_modules"):
        for path in _modules(package):
            graph[_name(path)] = {m for _, m, _ in _project_imports(path)}
    upward = [(name, m) for name, imported in graph.items() for m in imported if _layer(m) > _layer(name)]
    assert upward == []

    cleared: set[str] = set()  # nodes from which no cycle can be reached

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, set()) - cleared):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            found = cycle_from(nxt, [*path, nxt])
            if found:
                return found
        cleared.add(node)
        return None

    cycles = [c for start in graph if (c := cycle_from(start, [start]))]
    assert cycles == []


def test_every_override_says_so() -> None:
    """A misspelt Lightning hook never runs, silently: every method that overrides one carries `@override` (and
    mypy then checks the name and signature against the base)."""
    missing = []
    for package in ("datamodules", "lightning_modules"):
        for path in _modules(package):
            module = importlib.import_module(_name(path))
            tree = ast.parse(path.read_text())
            for node in (n for n in tree.body if isinstance(n, ast.ClassDef)):
                bases = getattr(module, node.name).__mro__[1:]
                for item in node.body:
                    if not isinstance(item, ast.FunctionDef) or item.name.startswith("__"):
                        continue
                    overrides = any(item.name in base.__dict__ for base in bases if base is not object)
                    marked = any(isinstance(d, ast.Name) and d.id == "override" for d in item.decorator_list)
                    if overrides and not marked:
                        missing.append(f"{path.relative_to(REPO)}:{item.lineno} {node.name}.{item.name}")
    assert missing == []


def test_one_seam_touches_the_distributed_wrapper() -> None:
    """Only `finetuning.ddp.rewrap_ddp` replaces the strategy's wrapped model (docs/multi-gpu.md)."""
    writers = []
    for package in ("datamodules", "lightning_modules"):
        for path in _modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "model" for t in node.targets
                ):
                    writers.append(f"{path.stem}:{node.lineno}")
    assert len(writers) == 1 and writers[0].startswith("ddp:"), writers
