"""The client ships on its own: lstmd.client needs only grpcio, protobuf and the health
service's stubs, never the server, ONNX Runtime or numpy, and its modules import no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parent.parent / "client"
FORBIDDEN = ("numpy", "onnxruntime", "lstmd.server", "lstmd.model.graph", "lstmd.export")

# Every forbidden module fails to import, as in a venv with the client's dependencies only;
# then every client module is imported, the CLI parses its arguments, and none came in anyway.
_PROBE = f"""
import importlib, sys
FORBIDDEN = {FORBIDDEN!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ModuleNotFoundError(f"{{name}} is not installed here", name=name)
        return None

sys.meta_path.insert(0, Refuse())
for module in sys.argv[1:]:
    importlib.import_module(module)
from lstmd.client.cli import build_parser
build_parser().parse_args(["bench", "--streams", "2"])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
assert not loaded, loaded
"""


def _files() -> dict[str, Path]:
    return {"lstmd.client" + ("" if p.stem == "__init__" else f".{p.stem}"): p for p in sorted(CLIENT.glob("*.py"))}


def test_the_client_imports_without_the_server_onnxruntime_or_numpy() -> None:
    modules = [m for m in _files() if m != "lstmd.client.__main__"]
    done = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _imports(path: Path) -> set[str]:
    """The lstmd.client modules ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from package import module
    return found & _files().keys()


def test_no_import_cycle_among_the_client_modules() -> None:
    graph = {module: _imports(path) for module, path in _files().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*path, module])
            done.add(module)

    for module in graph:
        visit(module, [])
