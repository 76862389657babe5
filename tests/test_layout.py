"""The package graph is one-way, read from the code's own imports (function-level ones too).

    model/     imports nothing of ours
    training/  model/                  serve/  model/
    db/        model/                  deploy/ any of them; nothing imports deploy/
    recsql_cli (the console script) may import any of them; none imports it

and no two files of one package import each other, directly or round a longer circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the other packages of ours it may import
ALLOWED = {
    "model": set(),
    "training": {"model"},
    "serve": {"model"},
    "db": {"model"},
    "deploy": {"model", "training", "serve", "db"},
    "abtest": {"model", "training", "serve", "db"},
}
OURS = set(ALLOWED) | {"recsql_cli"}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of our packages under root."""
    names = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The modules of ours that `module` (the file at `path`) imports, anywhere in it:
    `import a.b`, `from a import b` (b a module or a name), relative imports, and
    `importlib.import_module("a.b")` with a literal name."""
    known = set(known)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        found.update(t for t in targets if t.split(".")[0] in OURS)
    found.discard(module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    names = module_names(root)
    return {module: imports_of(module, path, names) for module, path in names.items()}


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Imports across packages that ALLOWED does not permit, and circles inside a package."""
    found = []
    for module, targets in sorted(graph.items()):
        package = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED.get(package, set()):
                found.append(f"{module} imports {target}: {package}/ may not import {other}")
    found += [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    return found


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One circle (first module repeated at the end) per group of modules of one package
    that reach each other (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def inside(module: str) -> list[str]:
        package = module.split(".")[0]
        return sorted(t for t in graph.get(module, ()) if t.split(".")[0] == package)

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in inside(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_circle_through(group, inside) for group in groups]


def _circle_through(group: list[str], inside) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for module in frontier:
            for target in inside(module):
                if target == start:
                    return paths[module] + [start]
                if target in members and target not in paths:
                    paths[target] = paths[module] + [target]
                    nxt.append(target)
        frontier = nxt
    raise AssertionError(f"no circle through {group}")  # cannot happen for an SCC


# ------------------------------------------------------------------------------- tests


def test_the_package_graph_is_one_way_and_no_package_has_an_import_circle() -> None:
    graph = import_graph(ROOT)
    assert {m.split(".")[0] for m in graph} == set(ALLOWED)
    assert violations(graph) == []


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    files = {
        "model/__init__.py": "from model.core import thing\n",
        "model/core.py": "import numpy\nthing = 1\n",
        "serve/__init__.py": "",
        "serve/a.py": "from . import b\nfrom .b import x\n",
        "serve/b.py": "def f():\n    from serve import a\n    import training.loop\n",
        "training/__init__.py": "",
        "training/loop.py": "import importlib\n\nimportlib.import_module('deploy.cli')\n",
        "db/__init__.py": "",
        "deploy/__init__.py": "",
        "deploy/cli.py": "from model import thing\nimport recsql_cli\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["model"] == {"model.core"} and graph["model.core"] == set()
    assert graph["serve.a"] == {"serve.b"}
    assert graph["serve.b"] == {"serve.a", "training.loop"}
    assert graph["training.loop"] == {"deploy.cli"}
    assert graph["deploy.cli"] == {"model", "recsql_cli"}
    assert violations(graph) == [
        "deploy.cli imports recsql_cli: deploy/ may not import recsql_cli",
        "serve.b imports training.loop: serve/ may not import training",
        "training.loop imports deploy.cli: training/ may not import deploy",
        "circle: serve.a -> serve.b -> serve.a",
    ]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"model.a": {"model.b"}, "model.b": set(), "serve.x": {"model.a"}}, []),
        ({"db.x": {"serve.app"}}, ["db.x imports serve.app: db/ may not import serve"]),
        (
            {"model.a": {"recsql_cli"}},
            ["model.a imports recsql_cli: model/ may not import recsql_cli"],
        ),
        (
            {
                "training.a": {"training.b"},
                "training.b": {"training.c"},
                "training.c": {"training.a"},
            },
            ["circle: training.a -> training.b -> training.c -> training.a"],
        ),
        # a circle through another package is a package-level error, reported as such
        (
            {"serve.a": {"deploy.b"}, "deploy.b": {"serve.a"}},
            ["serve.a imports deploy.b: serve/ may not import deploy"],
        ),
    ],
)
def test_the_checker_on_fake_graphs(graph: dict[str, set[str]], expected: list[str]) -> None:
    assert violations(graph) == expected
