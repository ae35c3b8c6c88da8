"""The layout tells the architecture: the import graph of oncely's modules
has no cycles (also none hidden by imports inside functions), and no module
is over the size limit. Read from the source with `ast`; nothing imported.

An edge `a -> b` is an import of module `b` anywhere in `a` (module level,
inside a function or a class). `import x.y` is an edge to `x.y` only, not to
its parent packages: a package's `__init__` counts only where its own names
are imported (`from oncely import App` is an edge to `oncely`). Imports under
`if TYPE_CHECKING:` never run, so they are left out of the cycle check (they
are annotations only); every other import counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    """Every module of the oncely package, by dotted name, from pyproject's
    package-dir mapping (one top-level folder per stage)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mods: dict[str, Path] = {}
    for package, folder in config["package-dir"].items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            mods[name] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str) -> list[tuple[str, bool]]:
    """(imported dotted name, under TYPE_CHECKING) for every import in the
    tree, with `from a import b` given as both `a.b` and `a` candidates."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, typing_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.extend((f"{base}.{a.name}|{base}", typing_only) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(tree, False)
    return found


def _graph(mods: dict[str, Path], with_typing: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.stem == "__init__" else mod.rpartition(".")[0]
        for name, typing_only in _imports(ast.parse(path.read_text(), str(path)), package):
            if typing_only and not with_typing:
                continue
            target = next((c for c in name.split("|") if c in mods), None)
            if target is None:  # `import a.b.c`: the deepest module that is ours
                parts = name.split("|")[0].split(".")
                target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                               if ".".join(parts[:i]) in mods), None)
            if target is not None and target != mod:
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = _graph(_modules(), with_typing=False)
    assert "oncely.runtime" in graph["oncely.cli"], "cli imports runtime inside a function"
    assert "oncely.app" in graph["oncely.runtime"]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph(_modules(), with_typing=False))
    assert not cycles, "import cycles (imports inside functions count too):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_module_over_the_line_limit() -> None:
    over = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not over, over


def test_the_public_api_and_the_sdk_import_no_kafka_and_no_rocksdb() -> None:
    """Handlers run where there is no broker client (a remote endpoint), and
    `import oncely` stays cheap: librdkafka and RocksDB load on first use."""
    code = ("import sys, oncely, oncely.sdk, oncely.sdk.journal, oncely.sdk.runner\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('confluent_kafka', 'rocksdict'))\n"
            "assert not heavy, heavy\n"
            "assert oncely.Client.__module__ == 'oncely.client'\n"
            "assert 'confluent_kafka' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_package_is_typed() -> None:
    assert (ROOT / "oncely" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in config["package-data"]["oncely"]


def test_design_md_names_every_module() -> None:
    """docs/design.md's layout table gives each module's job in one line."""
    design = (ROOT / "docs" / "design.md").read_text()
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    missing = [f"{d}/{f.name}" for d in dirs.values() for f in sorted((ROOT / d).glob("*.py"))
               if f.name != "__init__.py" and f"`{d}/{f.name}`" not in design]
    assert not missing, f"modules without a row in docs/design.md: {missing}"
