"""lstmd-server as a process: start-up checks, logging, and graceful shutdown under load."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import start_process


@pytest.fixture
def server_process(models_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    process, port = start_process(models_dir, "--grace-s", "20")
    yield process, port
    if process.poll() is None:
        process.kill()
    process.communicate()


async def test_sigterm_under_load_finishes_in_flight_calls_and_exits_0(
    server_process: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = server_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)
        streams = [stub.Stream() for _ in range(8)]
        generate = stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=1024))
        for stream in streams:
            await stream.write(pb.StreamRequest(text="the"))
            reply = await stream.read()
            assert isinstance(reply, pb.Prediction) and reply.position == 1
        await generate.read()
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # no new calls
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for stream in streams:  # in-flight streams keep working until they end
            for word in ("cat", "sat"):
                await stream.write(pb.StreamRequest(text=word))
                await stream.read()
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
        received = 1
        while await generate.read() != grpc.aio.EOF:
            received += 1
        assert received == 1024 and await generate.code() == grpc.StatusCode.OK
    assert process.wait(timeout=30) == 0


def test_refuses_to_start_on_a_broken_model_folder(models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    (broken / "tiny2/1/model.onnx").write_bytes(b"not a model")
    result = subprocess.run(
        [sys.executable, "-m", "lstmd.server", "--models-dir", str(broken)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "cannot serve" in result.stderr and "tiny2/1" in result.stderr and "checksum" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--providers", "cuda"], "CUDAExecutionProvider asked for"),
        (["--default-model", "nope"], "--default-model 'nope' is not among the loaded models"),
    ],
)
def test_refuses_impossible_settings(models_dir: Path, flags: list[str], message: str) -> None:
    import onnxruntime

    if "cuda" in flags and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        flags = ["--providers", "cpu,tpu"]  # a machine with CUDA: still an impossible setting
        message = "--providers takes"
    result = subprocess.run([sys.executable, "-m", "lstmd.server", "--models-dir", str(models_dir), *flags],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr


def test_json_log_format(models_dir: Path) -> None:
    process, _ = start_process(models_dir, "--log-format", "json")
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0
    lines = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    assert any(entry["message"] == "stopped" and entry["level"] == "info" for entry in lines)
