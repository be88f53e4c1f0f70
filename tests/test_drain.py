"""Drain for load balancers: on SIGTERM the health service says NOT_SERVING for LSTMD_DRAIN_S while
calls are still served, and only then does the listener close. Real server processes, raw stubs;
the last test runs two replicas sharing Redis behind the deployed nginx config."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import Nginx, Redis, free_port
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc
from tests.conftest import ServerProcess
from tests.test_metrics import scrape

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FEEDS = ("grpc_server_handled_total", frozenset({("grpc_type", "unary"), ("grpc_service", "lstmd.v1.Lstmd"),
                                                 ("grpc_method", "Feed"), ("grpc_code", "OK")}))  # fmt: skip


def health(target: str) -> int | None:
    """The health status of ``target``, or None when it answers no call (the listener closed)."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return None
        return int(reply.status)


def feeder(target: str, stop: threading.Event, failures: list[str], fed: list[float]) -> Callable[[], None]:
    """A client feeding one session one token at a time with expected_position, on its own channel,
    until ``stop``: every answer's time goes to ``fed``, every failed call to ``failures``."""

    def run() -> None:
        with grpc.insecure_channel(target) as channel:
            stub: Any = lstmd_pb2_grpc.LstmdStub(channel)
            session = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
            position = 0
            while not stop.is_set():
                request = pb.FeedRequest(session_id=session, tokens=pb.TokenIds(ids=[5 + position % 40]),
                                         expected_position=position)  # fmt: skip
                try:
                    position = stub.Feed(request, timeout=10).position
                    fed.append(time.monotonic())
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")
                    return
                time.sleep(0.005)

    return run


def test_sigterm_keeps_serving_calls_while_health_says_not_serving(models_dir: Path) -> None:
    drain = 1.5
    server = ServerProcess(models_dir, "--drain-s", str(drain))
    stop, failures, fed = threading.Event(), list[str](), list[float]()
    thread = threading.Thread(target=feeder(server.target, stop, failures, fed))
    try:
        thread.start()
        while not fed:
            time.sleep(0.01)
        assert health(server.target) == SERVING
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        seen: list[tuple[float, int | None]] = []  # (seconds after the signal, status)
        while server.process.poll() is None and time.monotonic() - signalled < 30:
            seen.append((time.monotonic() - signalled, health(server.target)))
            time.sleep(0.05)
        stop.set()
        thread.join(15)
        assert server.wait() == 0
    finally:
        server.close()
    not_serving = [t for t, status in seen if status == NOT_SERVING]
    assert not_serving, f"health never said NOT_SERVING: {seen}"
    assert all(status in (NOT_SERVING, None) for t, status in seen if t > not_serving[0])
    # NOT_SERVING was visible for the drain (not for an instant), and feeds were answered all along it
    assert not_serving[-1] - not_serving[0] >= drain - 0.5, seen
    answered_while_draining = [t - signalled for t in fed if not_serving[0] < t - signalled < not_serving[-1]]
    assert len(answered_while_draining) >= 10
    # The one call that may fail is one the listener's close refused: UNAVAILABLE, or CANCELLED when it had
    # reached gRPC core but not yet the event loop (a busy machine), which gRPC then cancels unstarted; the
    # client library retries both (client._recovery.Backoff).
    assert failures in ([], [failures[0]]), failures
    assert all(f.startswith(("UNAVAILABLE", "CANCELLED")) for f in failures), failures
    assert "draining: health NOT_SERVING" in server.log()


def test_a_second_signal_skips_the_rest_of_the_drain(models_dir: Path) -> None:
    server = ServerProcess(models_dir, "--drain-s", "120")
    try:
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while health(server.target) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(server.target) == NOT_SERVING
        server.process.send_signal(signal.SIGINT)
        assert server.wait(timeout=15) == 0  # far less than the 120 s drain
    finally:
        server.close()


@pytest.fixture
def cluster(models_dir: Path, tmp_path: Path) -> Iterator[tuple[list[ServerProcess], Nginx]]:
    """Two replicas sharing sessions in Redis, each draining 2 s on SIGTERM, behind the deployed nginx config."""
    (tmp_path / "redis").mkdir()
    redis = Redis(tmp_path / "redis")
    ports = [free_port(), free_port()]
    replicas = [ServerProcess(models_dir, "--session-store", redis.url, "--port", str(port), "--drain-s", "2")
                for port in ports]  # fmt: skip
    nginx = Nginx(tmp_path / "nginx", ports)
    try:
        yield replicas, nginx
    finally:
        nginx.stop()
        for replica in replicas:
            replica.close()
        redis.stop()


def test_a_replica_drains_through_nginx_without_a_failed_call(
    cluster: tuple[list[ServerProcess], Nginx], figures: Callable[[str], None]
) -> None:
    (leaving, staying), nginx = cluster
    stop, failures, fed = threading.Event(), list[str](), list[float]()
    threads = [threading.Thread(target=feeder(nginx.target, stop, failures, fed)) for _ in range(6)]
    for thread in threads:
        thread.start()
    while len(fed) < 60:
        time.sleep(0.01)
    before = scrape(leaving.metrics_port).get(FEEDS, 0)
    signalled = time.monotonic()
    leaving.process.send_signal(signal.SIGTERM)
    statuses: list[tuple[float, int | None]] = []
    answered_by_leaving = 0.0
    while leaving.process.poll() is None and time.monotonic() - signalled < 30:
        status = health(leaving.target)
        statuses.append((time.monotonic() - signalled, status))
        if status == NOT_SERVING:
            with contextlib.suppress(OSError):  # its metrics port closes last, just before it exits
                answered_by_leaving = scrape(leaving.metrics_port).get(FEEDS, 0) - before
        time.sleep(0.05)
    exited = time.monotonic()
    while time.monotonic() - exited < 1.5:  # the load goes on through nginx, now all to the other replica
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert leaving.wait() == 0
    assert health(staying.target) == SERVING
    draining = [t for t, status in statuses if status == NOT_SERVING]
    assert draining and draining[-1] - draining[0] >= 1.5, statuses
    after = [t for t in fed if t > exited]
    assert failures == [], failures
    assert answered_by_leaving > 0  # it served calls while its health said NOT_SERVING
    assert len(after) >= 20  # and the other replica took the load once it left
    figures(f"drain/nginx: {len(fed)} feeds through nginx by 6 clients, 0 failed; the leaving replica said "
            f"NOT_SERVING for {draining[-1] - draining[0]:.1f} s (LSTMD_DRAIN_S=2) and answered "
            f"{answered_by_leaving:.0f} feeds meanwhile; {len(after)} feeds in the 1.5 s after it exited")  # fmt: skip
