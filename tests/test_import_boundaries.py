"""Import boundaries of the lstmd package, read from the source (every import statement, those
inside functions included) and checked by importing too:

- lstmd.server never imports lstmd.export or torch (the server's image has neither);
- lstmd.client never imports lstmd.server, onnxruntime or numpy (it installs alone);
- lstmd.model (folder and tokenizer) is what the three share; the tokenizer libraries (tokenizers,
  sentencepiece) are reached only through lstmd.model.library_tokenizers, never from the client;
  no module of lstmd is in an import cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lstmd

PACKAGE = Path(lstmd.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of lstmd by name, following the links to server/, client/ and export/."""
    found = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        parts = Path(folder).relative_to(PACKAGE.parent).parts
        if not (Path(folder) / "__init__.py").exists():
            continue  # data folders (the bundled model, the corpus)
        for name in files:
            if name.endswith(".py"):
                module = [*parts] if name == "__init__.py" else [*parts, name[:-3]]
                found[".".join(module)] = Path(folder) / name
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """What ``module`` imports, anywhere in its file, except under ``if TYPE_CHECKING:``: modules of
    lstmd by full name, others by their top-level name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from package import module`` imports the module; ``from module import name``, the module
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name if name in MODULES or name.split(".")[0] == "lstmd" else name.split(".")[0] for name in found}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _reach(roots: list[str]) -> set[str]:
    """Everything importing ``roots`` can import, parent packages (whose __init__ runs first) included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo += [*GRAPH.get(module, ()), *parents]
    return seen


def _forbidden(reached: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in reached if m in prefixes or m.startswith(tuple(p + "." for p in prefixes)))


def _importers(reached_from: str, target: str) -> list[str]:
    return sorted(m for m in _reach([reached_from]) if m in MODULES and target in GRAPH[m])


def test_the_graph_sees_the_whole_package() -> None:
    """A check on the checker: it finds the package's modules and the imports it is here to forbid."""
    assert {"lstmd.server.engine", "lstmd.client.cli", "lstmd.export.train", "lstmd.model.graph"} <= set(MODULES)
    assert "torch" in GRAPH["lstmd.export.train"] and "numpy" in GRAPH["lstmd.model.graph"]
    assert "lstmd.model.tokenizer" in GRAPH["lstmd.client.cli"]
    assert {"tokenizers", "sentencepiece"} <= GRAPH["lstmd.model.library_tokenizers"]  # imported inside classes


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("lstmd.server", ("lstmd.export", "torch")),
        (
            "lstmd.client",
            (
                "lstmd.server",
                "lstmd.export",
                "lstmd.model.graph",
                "lstmd.model.library_tokenizers",
                "onnxruntime",
                "numpy",
                "torch",
                "tokenizers",
                "sentencepiece",
            ),
        ),
        ("lstmd.model.folder", ("lstmd.server", "lstmd.client", "lstmd.export", "numpy", "onnxruntime", "torch")),
        (
            "lstmd.model.tokenizer",
            (
                "lstmd.server",
                "lstmd.client",
                "lstmd.export",
                "numpy",
                "onnxruntime",
                "torch",
                "lstmd.model.library_tokenizers",
                "tokenizers",
                "sentencepiece",
            ),
        ),
        ("lstmd.model.graph", ("lstmd.server", "lstmd.client", "lstmd.export", "torch")),
    ],
)
def test_import_boundaries(package: str, forbidden: tuple[str, ...]) -> None:
    roots = [m for m in MODULES if m == package or m.startswith(package + ".")]
    reached = _reach(roots)
    bad = _forbidden(reached, forbidden)
    assert not bad, f"{package} reaches {bad}: " + "; ".join(
        f"{b} imported by {_importers(roots[0], b) or [m for m in reached if m in MODULES and b in GRAPH[m]]}"
        for b in bad
    )


def test_no_import_cycle() -> None:
    """Strongly connected components of the import graph (Tarjan's algorithm) larger than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in GRAPH[module] & MODULES.keys():
            if other not in index:
                connect(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1 or module in GRAPH[module]:
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            connect(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("lstmd.server", ("lstmd.export", "torch")), ("lstmd.client", ("lstmd.server", "onnxruntime", "numpy"))],
)
def test_importing_every_module_loads_nothing_forbidden(package: str, forbidden: tuple[str, ...]) -> None:
    """The same boundaries at run time, in a fresh interpreter: import every module of the package."""
    modules = [m for m in MODULES if m.startswith(package) and not m.endswith(".__main__")]  # those run a program
    code = ";".join(f"import {m}" for m in modules) + ";import sys;print(*sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    loaded = set(done.stdout.split())
    assert not _forbidden(loaded, forbidden)
