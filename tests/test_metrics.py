"""Metrics as Prometheus sees them: scrape /metrics over HTTP before and after calls."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lstmd.server.app import RunningServer
from lstmd.v1 import lstmd_pb2 as pb
from tests.conftest import memory_sessions


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
    assert delta(before, after, "lstmd_tokens_total", model="tiny", phase="step") == 5
    assert delta(before, after, "lstmd_tokens_total", model="tiny", phase="prompt") == 2
    assert delta(before, after, "lstmd_batch_size_count", model="tiny", phase="prompt") == 1
    assert delta(before, after, "lstmd_batch_size_count", model="tiny", phase="step") == 5
    assert delta(before, after, "lstmd_batch_size_bucket", model="tiny", phase="step", le="1.0") == 5
    assert delta(before, after, "lstmd_queue_wait_seconds_count", model="tiny") == 6
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
