"""The layout of ``src/dino``, read from the source (no import runs): no import cycles between
files or between packages, lower layers never import higher ones, no private name imported from
another file, and no file over 450 lines. Imports inside functions count the same as those at the
top of a file: a lazy import still ties the two modules together.

The layers, lowest first (a module may import its own layer and those below):

0. ``errors``, ``imagenet``, ``atomic_files``, ``value_checks``, ``devices``: plain facts and tools;
1. ``config`` (the schema), then ``config_checks``, ``config_load``;
2. ``data``, ``models``, ``loss``: what training and evaluation are made of;
3. ``eval``: frozen-feature evaluations;
4. ``viz``: pictures, which draw eval's outputs (``viz`` imports ``eval``, never the reverse);
5. ``training``: may use ``eval`` (its k-NN monitor) and ``viz``; eval never imports training;
6. ``cli``, and the package's ``__init__`` (the public API).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dino"
MAX_LINES = 450

#: Layer of each first-level part of ``dino`` (see the module docstring).
LAYERS = {
    "errors": 0,
    "imagenet": 0,
    "atomic_files": 0,
    "value_checks": 0,
    "devices": 0,
    "config": 1,
    "config_checks": 1,
    "config_load": 1,
    "data": 2,
    "models": 2,
    "loss": 2,
    "eval": 3,
    "viz": 4,
    "training": 5,
    "cli": 6,
    "__init__": 6,
    "__main__": 6,
}
#: Within layer 1, the schema is below its readers.
CONFIG_ORDER = {"config": 0, "config_checks": 1, "config_load": 2}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = source_files()


@cache
def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` of every ``dino`` import of a file, at any depth
    (functions included); relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("dino")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base == "dino" or base.startswith("dino."):
                out += [(base, a.name, node.lineno) for a in node.names]
    return out


@cache
def _edges() -> dict[str, frozenset[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for module, imported, _line in imports_of(path):
            target = f"{module}.{imported}" if f"{module}.{imported}" in MODULES else module
            if target != name and target in MODULES:
                graph[name].add(target)
        graph.setdefault(name, set())
    return {name: frozenset(targets) for name, targets in graph.items()}


def edges() -> dict[str, set[str]]:
    """Module -> the ``dino`` modules (files) it imports (a fresh copy)."""
    return {name: set(targets) for name, targets in _edges().items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def part(module: str) -> str:
    """The first-level part of ``dino`` a module belongs to (``dino.eval.knn`` -> ``eval``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_checks_see_the_package() -> None:
    graph = edges()
    assert len(MODULES) > 50
    assert "dino.config" in graph["dino.data.tensor_aug"]  # a known import is found
    assert "dino.models.weights" in graph["dino.cli.flags"]  # one inside a function too
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert set(LAYERS) >= {part(m) for m in MODULES}, "a new part of dino needs a layer"


def test_no_import_cycles_between_files() -> None:
    assert cycles(edges()) == []


def test_no_import_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges().items():
        graph[part(a)] |= {part(b) for b in targets if part(b) != part(a)}
    graph.pop("__init__", None)  # the public API imports from everywhere, and nothing imports it
    for targets in graph.values():
        targets.discard("__init__")
    assert cycles(graph) == []


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for a, targets in edges().items():
        for b in targets:
            pa, pb = part(a), part(b)
            if pb == "__init__":
                wrong.append(f"{a} imports the package root {b}")
            elif LAYERS[pb] > LAYERS[pa] or (
                pa in CONFIG_ORDER and pb in CONFIG_ORDER and CONFIG_ORDER[pb] > CONFIG_ORDER[pa]
            ):
                wrong.append(f"{a} (layer {LAYERS[pa]}) imports {b} (layer {LAYERS[pb]})")
    assert wrong == []


def test_eval_never_imports_training() -> None:
    wrong = [
        (a, b) for a, t in edges().items() for b in t if (part(a), part(b)) == ("eval", "training")
    ]
    assert wrong == []


def test_no_private_names_imported_across_files() -> None:
    private = [
        f"{name}:{line} imports {imported} from {module}"
        for name, path in MODULES.items()
        for module, imported, line in imports_of(path)
        if imported is not None and imported.startswith("_") and imported != "__version__"
    ]
    assert private == []


@pytest.mark.parametrize("limit", [MAX_LINES])
def test_no_file_over_the_line_limit(limit: int) -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > limit
    }
    assert long == {}
