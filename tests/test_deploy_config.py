"""The deployment's configuration, checked without docker: the Grafana dashboard queries only
metrics a real server exports, and the Prometheus and compose files fit together."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from lstmd.server.app import RunningServer
from lstmd.server.settings import Settings
from lstmd.v1 import lstmd_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/lstmd.json"
PROMQL_WORDS = {
    "sum", "rate", "by", "histogram_quantile", "le", "irate", "increase", "avg", "max", "min", "without", "on",
    "ignoring", "count", "and", "or", "unless", "offset",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers,
    ``by (...)`` groups and range selectors, that are not PromQL words."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\bby\s*\([^)]*\)", "", expr)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in PROMQL_WORDS}


def exported_metrics(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


async def test_every_dashboard_query_uses_metrics_the_server_exports(shared: tuple[RunningServer, Any]) -> None:
    running, stub = shared
    session = await stub.CreateSession(pb.CreateSessionRequest())
    await stub.Feed(pb.FeedRequest(session_id=session.session_id, text="the cat sat"))  # every labelled series exists
    exported = exported_metrics(running.metrics_port)
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            missing = names - exported
            assert not missing, f"panel {panel['title']!r} queries {missing}, which the server does not export"
            used |= names
    wanted = {"grpc_server_handled_total", "lstmd_inference_seconds_bucket", "lstmd_batch_size_bucket",
              "lstmd_queue_wait_seconds_bucket", "lstmd_sessions_active", "lstmd_sessions_evicted_total",
              "lstmd_sessions_expired_total", "lstmd_tokens_total", "lstmd_model_sessions", "process_cpu_seconds_total",
              "process_resident_memory_bytes"}  # fmt: skip
    assert wanted <= used


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(lstmd_queue_wait_seconds_bucket{model="x"}[5m])))'
    assert metric_names(expr) == {"lstmd_queue_wait_seconds_bucket"}


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/lstmd.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"] if v.endswith(":ro")
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert (ROOT / "deploy/grafana/dashboards").is_dir()


def test_prometheus_scrapes_the_lstmd_service_on_its_metrics_port() -> None:
    path = ROOT / "deploy/prometheus/prometheus.yml"
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "config", str(path)], check=True)
    config = yaml.safe_load(path.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "lstmd")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert job["static_configs"][0]["targets"] == [f"lstmd:{Settings().metrics_port}"]
    assert f"{Settings().metrics_port}:{Settings().metrics_port}" in compose["services"]["lstmd"]["ports"][1]


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_third_party_images_are_pinned(service: str) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"][service]["image"]
    assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), image


def test_sessions_survive_a_compose_restart_in_a_volume_the_image_user_owns() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    lstmd = compose["services"]["lstmd"]
    folder = lstmd["environment"]["LSTMD_SNAPSHOT_DIR"]
    mounted = {target: source for source, target in (v.split(":", 1) for v in lstmd["volumes"])}
    assert mounted[folder] in compose["volumes"]  # a named volume, so it outlives the container
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"mkdir {folder} && chown lstmd {folder}" in dockerfile and "USER lstmd" in dockerfile
