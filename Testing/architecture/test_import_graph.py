"""acecal's import graph, read from the source with :mod:`ast` (nothing is imported): no cycles between modules, none
between packages, and every function-local import says why it is there.

The layer order itself (cli above api above jobs above training ...) and the light client's forbidden libraries are
import-linter contracts in pyproject.toml (``make lint``); these tests keep the graph acyclic even where no contract
names a module, and they run with the suite.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "server" / "acecal"


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _top_level_imports(tree: ast.Module) -> list:
    """Import statements that run when the module is imported: module level, inside ``if``/``try`` blocks too, but
    not under ``if TYPE_CHECKING:`` and not in function bodies."""
    found = []

    def walk(body: list) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                found.append(stmt)
            elif isinstance(stmt, ast.If):
                if not _is_type_checking(stmt.test):
                    walk(stmt.body)
                walk(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                walk(stmt.body)
                for handler in stmt.handlers:
                    walk(handler.body)
                walk(stmt.orelse)
                walk(stmt.finalbody)

    walk(tree.body)
    return found


def _function_imports(tree: ast.Module) -> list:
    """(function, import statement) for every import inside a function body."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out.append((fn, node))
    return out


def _imported(module: str, is_package: bool, node: ast.AST, modules: set) -> set:
    """The modules of ``modules`` an import statement in ``module`` names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from x import y`: the module x.y when y is one, else (an attribute of x) the module x
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            out.add(".".join(parts))
    return out


def import_graph(root: Path, *, function_level: bool = False) -> dict:
    """module -> the package's modules it imports when it is imported (with ``function_level``: anywhere)."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = _top_level_imports(tree)
        if function_level:
            nodes += [node for _, node in _function_imports(tree)]
        deps = set()
        for node in nodes:
            deps |= _imported(name, path.name == "__init__.py", node, modules)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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


#: modules that are a layer of their own, below the package that holds them: ``storage.files`` (stdlib only) is what
#: every layer writes files with, bundles included, while the rest of ``storage`` sits above ``bundles`` and ``data``
BASE_MODULES = ("acecal.storage.files",)


def package_graph(graph: dict, root_name: str, base_modules: tuple = ()) -> dict:
    """The graph between the top-level packages and modules (``acecal.X``; each of ``base_modules`` a node of its
    own), self-imports dropped."""

    def top(m: str) -> str:
        return m if m in base_modules else ".".join(m.split(".")[:2])

    out: dict = {}
    for m, deps in graph.items():
        if m == root_name:
            continue
        out.setdefault(top(m), set()).update(top(d) for d in deps if d != root_name and top(d) != top(m))
    return out


# ------------------------------------------------------------------------------------------------------ the checks
def test_no_import_cycle_between_acecals_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "acecal.api.app" in graph and "acecal.errors" in graph["acecal.client.transport"]
    assert cycles(graph) == []


def test_no_cycle_between_acecals_packages_counting_function_local_imports():
    packages = package_graph(import_graph(PACKAGE, function_level=True), "acecal", BASE_MODULES)
    assert {"acecal.api", "acecal.storage", "acecal.inference", "acecal.calibration"} <= set(packages)
    assert cycles(packages) == []


def test_every_function_local_import_says_why():
    """A function-local import marks the torch / SimpleITK / MONAI / matplotlib boundary (or a light CLI command
    loading what only it needs): a comment on its line or on the lines just above it says which."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn, node in _function_imports(ast.parse("\n".join(lines))):
            i = node.lineno - 1
            reason = "#" in lines[i]
            j = i - 1  # the comment may head a group of imports
            while not reason and j >= fn.lineno:  # up to the def line (comments are not statements)
                text = lines[j].strip()
                if text.startswith("#") or ("#" in text and text.startswith(("import ", "from "))):
                    reason = True
                elif not (text.startswith(("import ", "from ")) or text == "" or text.startswith(('"""', "'''"))):
                    break
                j -= 1
            if not reason:
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not unexplained, "function-local imports without a reason:\n" + "\n".join(unexplained)


# ------------------------------------------------------------------------------------------- the checker can fail
def _package(tmp_path: Path, files: dict) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_graph_finds_module_and_package_cycles_and_skips_type_checking_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/x.py": "from pkg.b import y\n",
            "a/z.py": "from . import x\n",  # relative: a.z -> a.x
            "b/__init__.py": "",
            "b/y.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.a.x import thing  # not run: no cycle at import time
                def later():
                    from pkg.a import z  # run later: a package cycle a <-> b, not a module cycle
            """,
        },
    )
    graph = import_graph(root)
    assert graph["pkg.a.z"] == {"pkg.a.x"} and graph["pkg.a.x"] == {"pkg.b.y"} and graph["pkg.b.y"] == set()
    assert cycles(graph) == []
    every = import_graph(root, function_level=True)
    assert cycles(every) == [["pkg.a.x", "pkg.a.z", "pkg.b.y"]]
    assert cycles(package_graph(every, "pkg")) == [["pkg.a", "pkg.b"]]
    (root / "b" / "y.py").write_text("import pkg.a.x\n")
    assert cycles(import_graph(root)) == [["pkg.a.x", "pkg.b.y"]]


@pytest.mark.parametrize("name", ["acecal.protocol", "acecal.client.transport", "acecal.geometry", "acecal.nrrd"])
def test_the_light_client_modules_import_no_server_library(name):
    """The same promise as the import-linter contract, from the source: the light client's modules (and what they
    import of acecal, transitively) import only the standard library, numpy and requests."""
    graph = import_graph(PACKAGE)
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    heavy = ("torch", "monai", "fastapi", "starlette", "SimpleITK", "pydantic", "scipy", "matplotlib", "uvicorn")
    for m in sorted(seen):
        path = PACKAGE.parent.joinpath(*m.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in heavy], f"{m} imports {names}"
