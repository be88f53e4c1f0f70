"""Metrics as Prometheus sees them: scrape /metrics over HTTP before and after calls; and the
endpoint itself: the address it binds, the paths it answers, what idle connections cost it."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from lstmd.server import metrics_http
from lstmd.server.app import RunningServer
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import ServerProcess, memory_sessions


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_rpc_and_model_metrics_count_what_happened(shared: tuple[RunningServer, Any]) -> None:
    running, stub = shared
    session = await stub.CreateSession(pb.CreateSessionRequest())
    before = scrape(running.metrics_port)
    for word in ("the", "cat", "sat", "on", "the big mat"):
        await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=word))
    await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="")).code()  # INVALID_ARGUMENT
    after = scrape(running.metrics_port)

    rpc = {"grpc_type": "unary", "grpc_service": "lstmd.v1.Lstmd", "grpc_method": "Feed"}
    assert delta(before, after, "grpc_server_started_total", **rpc) == 6
    assert delta(before, after, "grpc_server_handled_total", **rpc, grpc_code="OK") == 5
    assert delta(before, after, "grpc_server_handled_total", **rpc, grpc_code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "grpc_server_handling_seconds_count", **rpc) == 6
    # "the big mat" ran as a prompt call ("the big") and then a single-token step ("mat")
    assert delta(before, after, "lstmd_tokens_total", model="tiny", version="1", phase="step") == 5
    assert delta(before, after, "lstmd_tokens_total", model="tiny", version="1", phase="prompt") == 2
    assert delta(before, after, "lstmd_batch_size_count", model="tiny", version="1", phase="prompt") == 1
    assert delta(before, after, "lstmd_batch_size_count", model="tiny", version="1", phase="step") == 5
    assert delta(before, after, "lstmd_batch_size_bucket", model="tiny", version="1", phase="step", le="1.0") == 5
    assert delta(before, after, "lstmd_queue_wait_seconds_count", model="tiny", version="1") == 6
    assert after[("lstmd_model_info", frozenset({"model": "tiny", "version": "1", "precision": "fp32",
                                                  "default": "true"}.items()))] == 1  # fmt: skip


async def test_no_session_id_in_any_label(shared: tuple[RunningServer, Any]) -> None:
    running, stub = shared
    session = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the"))
    for _, labels in scrape(running.metrics_port):
        assert session.session_id not in {v for _, v in labels}


async def test_session_gauges_and_counters(shared: tuple[RunningServer, Any]) -> None:
    running, stub = shared
    before = scrape(running.metrics_port)
    session = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.ForkSession(pb.ForkSessionRequest(session_id=session.session_id))
    await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id))
    after = scrape(running.metrics_port)
    assert delta(before, after, "lstmd_sessions_created_total") == 2
    assert delta(before, after, "lstmd_sessions_deleted_total") == 1
    assert delta(before, after, "lstmd_sessions_active") == 1
    assert after[("lstmd_sessions_active", frozenset())] == len(memory_sessions(running))


def listening(pid: int, port: int) -> set[str]:
    """The addresses process ``pid`` listens on at TCP ``port``."""
    connections = psutil.Process(pid).net_connections("tcp")
    return {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_metrics_port_listens_on_the_grpc_host_unless_told_otherwise(
    models_dir: Path, servers: list[ServerProcess]
) -> None:
    servers.append(default := ServerProcess(models_dir))  # --host 127.0.0.1
    assert listening(default.process.pid, default.metrics_port) == {"127.0.0.1"}
    servers.append(own := ServerProcess(models_dir, "--metrics-host", "0.0.0.0"))
    assert listening(own.process.pid, own.metrics_port) == {"0.0.0.0"}
    for server in servers:
        assert ("lstmd_sessions_active", frozenset()) in scrape(server.metrics_port)


def test_every_interface_is_ipv6_and_ipv4_as_grpc_reads_it() -> None:
    sock = metrics_http.bind("[::]", 0)
    with sock:
        port = sock.getsockname()[1]
        sock.setblocking(True)
        for address in ("127.0.0.1", "::1") if sock.family == socket.AF_INET6 else ("127.0.0.1",):
            with socket.create_connection((address, port), timeout=5):
                sock.accept()[0].close()


def get(port: int, method: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path)  # the path as it is, never normalised
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


async def test_only_metrics_is_served(shared: tuple[RunningServer, Any]) -> None:
    port = shared[0].metrics_port
    for path in ("/", "/../../etc/passwd", "/metricsx", "/metrics/", "/metrics/../metrics", "//metrics", "/x?/metrics"):
        status, body = get(port, "GET", path)
        assert (status, body) == (404, b"not found: the metrics are at /metrics\n"), path
    status, body = get(port, "GET", "/metrics?name[]=lstmd_sessions_active")
    assert status == 200 and b"lstmd_sessions_active" in body
    assert get(port, "HEAD", "/metrics") == (200, b"")
    assert get(port, "POST", "/metrics")[0] == 405


def test_half_open_connections_start_no_threads_and_metrics_still_scrape(
    models_dir: Path, servers: list[ServerProcess]
) -> None:
    servers.append(server := ServerProcess(models_dir))
    process = psutil.Process(server.process.pid)
    scrape(server.metrics_port)
    threads = process.num_threads()
    idle = [socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) for _ in range(200)]
    try:
        for i, sock in enumerate(idle):
            if i % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
        time.sleep(0.5)
        assert process.num_threads() <= threads + 1, "no thread per connection"
        assert ("lstmd_sessions_active", frozenset()) in scrape(server.metrics_port), "scrapes still answered"
        deadline = time.monotonic() + metrics_http.HEAD_TIMEOUT_S + 5
        for sock in idle:  # every idle connection is closed by the server: evicted, or timed out
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):  # closed with our request head unread: a reset
                assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert process.num_threads() <= threads + 1
