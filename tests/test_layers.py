"""The house (issue 29): fracgen/ and train/ import downward only, with no circle anywhere, and no function is
longer than a reader can hold (~100 lines; a Typer command's signature lists its options and does not count).

The imports are read from the source (module-level and inside functions alike), so a circle hidden behind a late
import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fracgen", "train")
MAX_LINES = 100


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules `name` imports (a `from package import module` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    out.add(full)
                elif base in known:
                    out.add(base)
    return out - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere():
    edges = graph()
    assert len(edges) > 40
    assert circles(edges) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# (module, what it must not import): the lower layers name themselves
LAYERS = [
    ("fracgen.limits", {"*"}),
    ("fracgen.settings", {"fracgen.shards", "fracgen.manifest", "fracgen.systems", "fracgen.dataset"}),
    ("fracgen.shards", {"fracgen.settings", "fracgen.systems", "fracgen.manifest", "fracgen.dataset"}),
    ("fracgen.systems.base", {"fracgen.systems", "fracgen.manifest", "fracgen.dataset", "fracgen.shards"}),
    ("fracgen.manifest", {"fracgen.dataset", "fracgen.share"}),
]


@pytest.mark.parametrize(("module", "forbidden"), LAYERS, ids=[m for m, _ in LAYERS])
def test_lower_layers_import_nothing_above_them(module, forbidden):
    imported = graph()[module]
    project = {m for m in imported if m.split(".")[0] in PACKAGES}
    if "*" in forbidden:
        assert project == set()
    else:
        assert not {m for m in project if m in forbidden or any(m.startswith(f + ".") for f in forbidden)}


def test_fracgen_never_imports_the_trainer():
    assert not {m for name, deps in graph().items() if name.startswith("fracgen") for m in deps
                if m.startswith("train")}


def _long_functions() -> list[tuple[str, str, int]]:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    body = body[1:]  # the docstring
                lines = node.end_lineno - body[0].lineno + 1  # the signature (a CLI's options) is not counted
                if lines > MAX_LINES:
                    long.append((name, node.name, lines))
    return long


def test_no_function_is_longer_than_a_page():
    assert _long_functions() == []
