"""Dependencies run one way: data below models, models below the CLI, the CLI below sweeps (DESIGN.md). Checked on
the code itself: what a fresh interpreter loads, and every import statement of the packages. Other libraries are
used through their public names, but for the private ones listed in docs/development.md."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import TypeGuard

import pytest

from tests.helpers import REPO

PACKAGES = ("datamodules", "lightning_modules", "scripts")
# lightning_modules' concerns from the bottom up (sub-packages, and `module`/`console` at its root; `api`: the
# other root files, which tie model, data and trainer together for a notebook): each imports only those before it
LAYERS = ("console", "backbones", "finetuning", "speed", "module", "reporting", "api", "serving", "cli", "sweeps")


# the list of another library's private names in use, with why: one home, parsed by the test below
PRIVATE_LIST = (REPO / "docs" / "development.md", "## Private names of other libraries")
PRIVATE = re.compile(r"_[A-Za-z0-9]\w*")  # one leading underscore: `_x`, not a dunder
NAME_OR_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a string that may name an attribute or a module
NAMEDTUPLE_API = {"_asdict", "_field_defaults", "_fields", "_make", "_replace"}  # public, underscored by design


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


def _overrides(node: ast.AST) -> TypeGuard[ast.FunctionDef | ast.AsyncFunctionDef]:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "override" for d in node.decorator_list
    )


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def _names_a_thing(value: object) -> bool:
    return isinstance(value, str) and NAME_OR_DOTTED.fullmatch(value) is not None


def _project_names(paths: list[Path]) -> set[str]:
    """Every name the project defines: modules, classes, functions (an `@override` redefines a base's), variables,
    arguments, import aliases and attributes set on `self` or `cls`."""
    names = {path.stem for path in paths}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and not _overrides(node):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _on_self(node):
                names.add(node.attr)
    return names


def _names_used(path: Path) -> set[str]:
    """What `path` names that may belong to another library: attributes, imported modules and names, methods
    it overrides, and strings that name an attribute or a dotted module (`getattr(x, "_y")`, a pickle's globals)."""
    tree = ast.parse(path.read_text())
    in_fstrings = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                names.update([*node.module.split("."), *(a.name for a in node.names)])
        elif isinstance(node, ast.Import):
            names.update(part for a in node.names if a.name.split(".")[0] not in PACKAGES for part in a.name.split("."))
        elif _overrides(node):
            names.add(node.name)
        elif isinstance(node, ast.Constant) and id(node) not in in_fstrings and _names_a_thing(node.value):
            names.update(str(node.value).split("."))
    return names


def _documented_private_names() -> set[tuple[str, str]]:
    """(file, private name) of each row of the doc's table: the file in the first column, and every `_name` in the
    code of the second (`CSVLogger._fs` lists `_fs`)."""
    doc, heading = PRIVATE_LIST
    text = doc.read_text()
    assert heading in text, f"{doc.relative_to(REPO)} lost its section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    return {
        (file.strip().strip("`"), name)
        for file, cell in rows
        for code in re.findall(r"`([^`]+)`", cell)
        for name in re.split(r"\W+", code)
        if PRIVATE.fullmatch(name)
    }


def test_every_private_name_of_another_library_is_documented() -> None:
    """A private attribute, function or module of another library (torch, Lightning, timm, numpy, optuna ...) can
    change in any release: each use is listed in docs/development.md with why, and nothing else uses one. The
    project's own private names (`self._x` it sets, `_helpers` it defines) are not counted."""
    paths = [path for package in PACKAGES for path in _modules(package)]
    ours = _project_names(paths) | NAMEDTUPLE_API
    used = {
        (path.relative_to(REPO).as_posix(), name)
        for path in paths
        for name in _names_used(path)
        if PRIVATE.fullmatch(name) and name not in ours
    }
    documented = _documented_private_names()
    undocumented, gone = sorted(used - documented), sorted(documented - used)
    assert not undocumented, f"use a public API, or give each a row in docs/development.md: {undocumented}"
    assert not gone, f"listed in docs/development.md but no longer used, remove them: {gone}"
