"""The house rules of DESIGN.md, checked on the source (issue 40): no import cycle anywhere in gill/, app/,
index/ and training/ (imports inside functions count: they run too); no import up the layers (the library
never imports the recipes, the recipes never import each other nor a private ``gill._x`` module); no
module over 500 lines and no function over 80 (benchmark scripts aside).

Files that other work is splitting now are listed below as known exceptions, each with its owner; an
exception that no longer applies fails the test, so the list only shrinks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gill", "app", "index", "training")
RECIPES = ("app", "index", "training")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# Known exceptions (the coordinator removes each once its owner's split is merged).
KNOWN_LONG_MODULES = {
}
KNOWN_LONG_FUNCTIONS = {
}
KNOWN_PRIVATE_IMPORTS = {
}


def module_files(packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` (a package is named by its folder)."""
    files = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its file (module level, inside functions, under
    TYPE_CHECKING), as dotted names: ``from a import b`` is ``a.b`` where that is a module of ``known``,
    else ``a``; a private name imported from a module is kept as ``a._b`` too (see ``private``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.add(full if full in known else module)
                if alias.name.startswith("_"):
                    found.add(full)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> every name it imports, module -> the modules of gill/app/index/training it imports)."""
    files = module_files()
    raw = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    inner = {name: {m for m in targets if m in files and m != name} for name, targets in raw.items()}
    return raw, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # walk inside the group from its first module until a module repeats
        path = [min(group)]
        while path.count(path[-1]) < 2:
            path.append(min(w for w in graph[path[-1]] if w in group))
        found.append(path[path.index(path[-1]):])
    return found


def private(module: str) -> bool:
    """``gill._io``, ``gill.x._y``: a part named with a leading underscore (``__main__`` is not private)."""
    return any(part.startswith("_") and not part.endswith("__") for part in module.split(".")[1:])


def test_the_graph_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                    "from . import sibling\nfrom ..up import thing\n"
                    "def f():\n    from gill.retrieval import _Replaced, Hit\n    import training.train as T\n",
                    encoding="utf-8")
    found = imports_of("pkg.sub.m", path, known={"pkg.sub.sibling"})
    assert found == {"typing", "torch", "pkg.sub.sibling", "pkg.up", "gill.retrieval", "gill.retrieval._Replaced",
                     "training.train"}
    _, inner = import_graph()
    assert "training.mapper_cache" in inner["training.train"]  # imported inside a function there
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert private("gill._io") and private("gill.x._y") and not private("gill.__main__") and not private("gill.io")


def test_no_import_cycle_anywhere():
    _, inner = import_graph()
    found = cycles(inner)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_up_the_layers():
    raw, _ = import_graph()
    upward = sorted((m, t) for m, targets in raw.items() if m.split(".")[0] == "gill"
                    for t in targets if t.split(".")[0] in (*RECIPES, "scripts"))
    assert not upward, f"the library imports the recipes: {upward}"
    across = sorted((m, t) for m, targets in raw.items() if m.split(".")[0] in RECIPES
                    for t in targets if t.split(".")[0] in RECIPES and t.split(".")[0] != m.split(".")[0])
    assert not across, f"recipes import each other: {across}"
    privately = {(m, t) for m, targets in raw.items() if m.split(".")[0] in RECIPES
                 for t in targets if t.split(".")[0] == "gill" and private(t)}
    assert not privately - set(KNOWN_PRIVATE_IMPORTS), \
        f"recipes import private gill modules or names (use the public API): {sorted(privately - set(KNOWN_PRIVATE_IMPORTS))}"
    stale = set(KNOWN_PRIVATE_IMPORTS) - privately
    assert not stale, f"no longer imported privately: remove {sorted(stale)} from KNOWN_PRIVATE_IMPORTS"


def long_functions(path: Path) -> dict[str, int]:
    """``qualified name -> lines`` of every function and method of a file over the bound."""
    found = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > MAX_FUNCTION_LINES:
                    found[name] = lines
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return found


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """(long modules, long functions) of gill/, app/, index/, training/ and scripts/ (benchmarks aside)."""
    paths = list(module_files().values()) + [p for p in sorted((ROOT / "scripts").glob("*.py"))
                                             if not p.name.startswith("bench_")]
    modules, functions = {}, {}
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES and not rel.startswith("scripts/"):
            modules[rel] = n
        functions |= {f"{rel}::{name}": lines for name, lines in long_functions(path).items()}
    return modules, functions


@pytest.mark.parametrize("kind", ["modules", "functions"])
def test_no_module_over_500_lines_and_no_function_over_80(kind):
    modules, functions = sizes()
    found, known, bound = ((modules, KNOWN_LONG_MODULES, MAX_MODULE_LINES) if kind == "modules"
                           else (functions, KNOWN_LONG_FUNCTIONS, MAX_FUNCTION_LINES))
    new = {name: n for name, n in found.items() if name not in known}
    assert not new, f"{kind} over {bound} lines (split them): {new}"
    stale = sorted(set(known) - set(found))
    assert not stale, f"within {bound} lines now: remove {stale} from the known exceptions"


def test_the_size_check_finds_a_long_method_and_a_long_inner_function(tmp_path):
    body = "".join(f"            x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "m.py"
    path.write_text("class C:\n    def short(self):\n        pass\n\n"
                    f"    def outer(self):\n        def inner():\n{body}\n", encoding="utf-8")
    assert long_functions(path) == {"C.outer": MAX_FUNCTION_LINES + 2, "C.outer.inner": MAX_FUNCTION_LINES + 1}
