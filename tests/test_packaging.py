"""What a user installs: a wheel built like one from a clean clone holds only ``lstmd``; its base
install is the client alone, which works in a fresh virtual environment against a server from
the full install, with none of the server's runtime present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Reference

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DEPENDENCIES = {"grpcio", "grpcio-health-checking", "protobuf"}


def _clean_copy(dst: Path) -> None:
    """The checkout as a clean clone would have it: what git tracks, plus what it would add."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src, out = ROOT / name, dst / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet in the index
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("clone"), tmp_path_factory.mktemp("wheel")
    _clean_copy(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True)  # fmt: skip
    (built,) = out.glob("lstmd-*.whl")
    return built


def test_the_wheel_holds_only_the_lstmd_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lstmd", f"lstmd-{version('lstmd')}.dist-info"}
    for expected in ("lstmd/server/models/pd-english/1/model.onnx", "lstmd/v1/lstmd.proto", "lstmd/py.typed",
                     "lstmd/client/__init__.py", "lstmd/export/cli.py", "lstmd/model/graph.py"):  # fmt: skip
        assert expected in names
    assert not [n for n in names if n.endswith(".py") and "/models/" in n], "the bundled model is data, no package"


def test_the_base_install_is_the_client_and_torch_only_comes_with_export(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        metadata = Parser().parsestr(
            z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        )
        scripts = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    requires = metadata.get_all("Requires-Dist") or []
    base = {r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert base == CLIENT_DEPENDENCIES
    torch = [r for r in requires if r.startswith("torch")]
    assert torch and all('extra == "export"' in r for r in torch)
    for script in ("lstmd = lstmd.client.cli:main", "lstmd-server = lstmd.server.cli:main",
                   "lstmd-export = lstmd.export.cli:main"):  # fmt: skip
        assert script in scripts


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel's base install: the client alone."""
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(wheel)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout's own venv
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=120, cwd=venv)  # fmt: skip


def test_the_client_alone_imports_without_the_servers_runtime(client_venv: Path) -> None:
    assert _run(client_venv, "python", "-c", "from lstmd.client import AsyncClient, Client").returncode == 0
    for module in ("onnxruntime", "numpy", "prometheus_client", "torch", "lstmd.server.app"):
        failed = _run(client_venv, "python", "-c", f"import {module}")
        assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr, module
    server = _run(client_venv, "lstmd-server")
    assert server.returncode == 2 and "pip install 'lstmd[server]'" in server.stderr


def test_the_client_alone_talks_to_a_server_from_the_full_install(
    client_venv: Path, server_target: str, reference: Reference
) -> None:
    health = _run(client_venv, "lstmd", "health", "--target", server_target)
    assert health.returncode == 0 and health.stdout.strip() == f"{server_target}: SERVING"
    predict = _run(client_venv, "lstmd", "predict", "the cat sat on the", "--target", server_target, "--json")
    assert predict.returncode == 0, predict.stderr
    got = json.loads(predict.stdout)["candidates"]
    # the answer ONNX Runtime gives for the same text, run directly from the model file
    logprobs = reference.logprobs(reference.ids("the cat sat on the"))
    best = np.argsort(-logprobs, kind="stable")[: len(got)]
    assert [c["token_id"] for c in got] == best.tolist()
    assert np.allclose([c["probability"] for c in got], np.exp(logprobs[best]), atol=1e-5)
