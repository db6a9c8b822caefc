"""The package's map: imports point one way, down the layers, and never in a circle.

Every module of ``xreal`` and ``flows`` is parsed with ``ast``; every import
counts, those inside functions too (a lazy import is still a dependency), and
relative imports are resolved. A subpackage of ``xreal`` sits on one layer; a
module may import its own subpackage and the layers below it, never one above.
Top-level modules of ``xreal`` (other than its ``__init__`` and ``xreal.text``,
whose path model bundles record) are the old import paths kept for one release:
they sit on top and nothing in the package imports them.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xreal", "flows")

# Bottom to top. A module may import from its own layer's subpackage or a lower layer.
LAYERS = (
    "xreal.core",
    "xreal.phantom",
    "xreal.data",
    "xreal.manifest",
    "xreal.judges",
    "xreal.model",
    "xreal.run",
    "xreal.evaluate",
    "flows",
    "xreal.cli",
    "xreal (old paths)",
)
SHIMS = "xreal (old paths)"
# Top-level modules that are not old paths: files on disk name them (a bundle's model_index.json says xreal.text).
FIXED_PATHS = {"xreal.text": "xreal.model"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an imported dotted name resolves to (itself or its nearest parent), if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a project module in ``module``'s source."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module
            # `from a import b` imports the module a.b when there is one, else names from a.
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        else:
            continue
        for name in names:
            target = _target(name)
            if target and target != module and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def layer(module: str) -> str | None:
    """The layer a module sits on; ``None`` for a module no layer claims."""
    if module == "xreal":
        return "xreal"
    if module in FIXED_PATHS:
        return FIXED_PATHS[module]
    for name in LAYERS:
        if module == name or module.startswith(name + "."):
            return name
    if module.count(".") == 1 and module.startswith("xreal.") and not (ROOT / "xreal" / module.split(".")[1]).is_dir():
        return SHIMS
    return None


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _explain(component: list[str], group) -> list[str]:
    """The imports that make up a cycle: each from a member to another member."""
    members = set(component)
    return [
        f"  {_where(module, line)}: {module} imports {target}"
        for module, imports in GRAPH.items()
        for target, line in imports
        if group(module) in members and group(target) in members and group(module) != group(target)
    ]


def test_the_walk_sees_the_package():
    assert len(MODULES) > 30 and "flows.generate" in MODULES
    assert sum(len(imports) for imports in GRAPH.values()) > 100


def test_no_import_cycle_between_modules():
    graph = {module: {target for target, _ in imports} for module, imports in GRAPH.items()}
    cycles = _cycles(graph)
    report = []
    for component in cycles:
        report += [f"import cycle between modules {', '.join(component)}:", *_explain(component, lambda m: m)]
    print("\n".join(report))
    assert not cycles, "\n" + "\n".join(report)


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "xreal" and len(parts) > 2 else module


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, imports in GRAPH.items():
        for target, _ in imports:
            if _subpackage(target) != _subpackage(module):
                graph.setdefault(_subpackage(module), set()).add(_subpackage(target))
    cycles = _cycles(graph)
    report = []
    for component in cycles:
        report += [f"import cycle between subpackages {', '.join(component)}:", *_explain(component, _subpackage)]
    print("\n".join(report))
    assert not cycles, "\n" + "\n".join(report)


def test_every_module_sits_on_a_layer():
    unplaced = sorted(module for module in MODULES if layer(module) is None)
    assert not unplaced, f"modules on no layer (add them to a subpackage in LAYERS): {unplaced}"


def test_imports_point_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module, imports in GRAPH.items():
        here = layer(module)
        if here == "xreal":  # the package's own __init__ imports nothing of its own
            upward += [f"  {_where(module, line)}: the xreal package imports {target}" for target, line in imports]
            continue
        for target, line in imports:
            there = layer(target)
            if here in rank and there in rank and rank[there] > rank[here]:
                upward.append(f"  {_where(module, line)}: {module} ({here}) imports {target} ({there}), a higher layer")
            elif here == SHIMS == there:
                upward.append(f"  {_where(module, line)}: old path {module} imports old path {target}")
    print("\n".join(upward))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_every_subpackage_says_what_it_owns():
    for name in LAYERS:
        if not name.startswith("xreal."):
            continue
        init = ROOT / Path(*name.split(".")) / "__init__.py"
        if init.is_file():
            assert len(ast.get_docstring(ast.parse(init.read_text())) or "") > 200, f"{init}: say what it owns"


def test_old_dataset_path_still_works_and_warns():
    sys.modules.pop("xreal.dataset", None)
    with pytest.warns(DeprecationWarning, match=r"xreal\.run\.dataset"):
        old = importlib.import_module("xreal.dataset")
    new = importlib.import_module("xreal.run.dataset")
    assert old.XRealDataset is new.XRealDataset
    assert old.write_card is new.write_card
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from xreal.run.dataset import XRealDataset  # noqa: F401 - the new path does not warn
