"""The base: the contract compiles, committed stubs are current, packages and CLIs start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lstmd.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
STUBS = ["lstmd_pb2.py", "lstmd_pb2.pyi", "lstmd_pb2_grpc.py", "lstmd_pb2_grpc.pyi"]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "proto/generate.sh"), str(tmp_path)], check=True, env=env, capture_output=True)
    for name in STUBS:
        fresh = (tmp_path / "lstmd/v1" / name).read_text()
        committed = (ROOT / "proto/lstmd/v1" / name).read_text()
        assert fresh == committed, f"proto/lstmd/v1/{name} is stale: run `bash proto/generate.sh`"


def test_contract_has_every_planned_rpc() -> None:
    from lstmd.v1 import lstmd_pb2

    service = lstmd_pb2.DESCRIPTOR.services_by_name["Lstmd"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "ListModels": (False, False),
        "CreateSession": (False, False),
        "GetSession": (False, False),
        "DeleteSession": (False, False),
        "ForkSession": (False, False),
        "Feed": (False, False),
        "Stream": (True, True),
        "FeedMany": (True, True),
        "Generate": (False, True),
        "Tokenize": (False, False),
        "ReloadModels": (False, False),
        "ExportSession": (False, False),
        "ImportSession": (False, False),
    }
    assert lstmd_pb2.DESCRIPTOR.package == "lstmd.v1"


@pytest.mark.parametrize("command", ["lstmd", "lstmd-server", "lstmd-export"])
def test_console_scripts_print_help(command: str) -> None:
    exe = shutil.which(command, path=str(Path(sys.executable).parent))
    assert exe, f"{command} is not installed"
    out = subprocess.run([exe, "--help"], check=True, capture_output=True, text=True).stdout
    assert out.startswith(f"usage: {command}")


@pytest.mark.parametrize("module", ["lstmd.client", "lstmd.server", "lstmd.export"])
def test_packages_run_as_modules(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], check=True, capture_output=True, text=True)
    assert "usage:" in out.stdout


def test_server_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lstmd.server", "--help"], check=True, capture_output=True, text=True
    ).stdout
    for name in Settings.__dataclass_fields__:
        assert f"LSTMD_{name.upper()}" in out


def test_settings_flag_beats_environment_beats_default() -> None:
    assert Settings.from_args([], environ={}).port == 50051
    assert Settings.from_args([], environ={"LSTMD_PORT": "6000"}).port == 6000
    assert Settings.from_args(["--port", "7000"], environ={"LSTMD_PORT": "6000"}).port == 7000


@pytest.mark.parametrize(
    ("argv", "environ"),
    [([], {"LSTMD_PORT": "fifty"}), (["--max-sessions", "0"], {}), (["--at-capacity", "drop"], {})],
)
def test_bad_settings_exit_with_a_message(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        Settings.from_args(argv, environ=environ)
    assert exc.value.code == 2
    assert "lstmd-server: error:" in capsys.readouterr().err


def test_readme_starts_with_the_two_quickstart_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2, "the quickstart is exactly two commands"
    serve, test = block
    assert "lstmd-server" in serve and "pytest" in test
    assert readme.index("```bash") < readme.index("\n## "), "the quickstart comes first"
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    assert test in ci_lines, ".ci/run must run the README test command verbatim"


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.__dataclass_fields__:
        assert f"`LSTMD_{name.upper()}`" in readme
