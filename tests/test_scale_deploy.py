"""The scale-out deployment's files, checked without docker or a cluster: the compose variant,
the nginx config (``nginx -t``) and the kustomize directory parse and agree with each other, and
the manifests kustomize renders pass the Kubernetes API's schemas."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bench.cluster import NGINX_CONF, binary, nginx_config
from lstmd.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy/docker-compose.scale.yml"
K8S = ROOT / "deploy/k8s"


def test_nginx_config_is_valid_with_loopback_upstreams(tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_config([50061, 50062], 50070, tmp_path))
    done = subprocess.run([binary("nginx"), "-t", "-c", str(config), "-p", str(tmp_path)], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "grpc_pass grpc://lstmd;" in NGINX_CONF.read_text()


def test_compose_scale_variant_fits_the_nginx_config_and_the_settings() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = compose["services"]
    replicas = sorted(name for name in services if name.startswith("lstmd-"))
    upstream = re.findall(r"server (lstmd-\d+):50051", NGINX_CONF.read_text())
    assert replicas == sorted(upstream) and len(replicas) >= 2, "nginx balances over exactly the compose replicas"
    for name in replicas:
        env = services[name]["environment"]
        store = Settings(session_store=env["LSTMD_SESSION_STORE"])
        assert not store.problems()
        assert store.session_store == "redis://redis:6379/0" and "redis" in services
        drain = float(env["LSTMD_DRAIN_S"])  # a replica leaving says NOT_SERVING before its listener closes
        assert drain > 0 and _seconds(services[name]["stop_grace_period"]) > drain + Settings().grace_s
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and any(v.endswith(":/data") for v in redis["volumes"])
    assert services["nginx"]["volumes"] == ["./nginx/nginx.conf:/etc/nginx/nginx.conf:ro"]
    assert (COMPOSE.parent / "nginx/nginx.conf").exists()
    assert set(compose["volumes"]) >= {"redis-data"}


def test_kustomize_directory_parses_and_agrees() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = [d for r in kustomization["resources"] for d in yaml.safe_load_all((K8S / r).read_text())]
    by_kind: dict[tuple[str, str], Any] = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert set(by_kind) == {("Deployment", "lstmd"), ("Service", "lstmd"), ("Service", "lstmd-headless"),
                            ("StatefulSet", "lstmd-redis"), ("Service", "lstmd-redis")}  # fmt: skip
    deployment = by_kind[("Deployment", "lstmd")]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    store = Settings(session_store=env["LSTMD_SESSION_STORE"])
    assert not store.problems()
    redis_service = by_kind[("Service", "lstmd-redis")]
    assert store.session_store == f"redis://lstmd-redis:{redis_service['spec']['ports'][0]['port']}/0"
    assert by_kind[("Service", "lstmd-headless")]["spec"]["clusterIP"] == "None"
    for name in ("lstmd", "lstmd-headless"):
        assert by_kind[("Service", name)]["spec"]["selector"] == {"app": "lstmd"}
        assert by_kind[("Service", name)]["spec"]["ports"][0]["targetPort"] == "grpc"
    assert {"containerPort": 50051, "name": "grpc"} in container["ports"]
    # the readiness probe notices the drain (NOT_SERVING) before it ends, and the pod is killed only after it
    probe, drain = container["readinessProbe"], float(env["LSTMD_DRAIN_S"])
    assert probe["periodSeconds"] * probe.get("failureThreshold", 3) < drain
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + Settings().grace_s
    statefulset = by_kind[("StatefulSet", "lstmd-redis")]
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis["args"] and redis["volumeMounts"][0]["mountPath"] == "/data"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == redis["volumeMounts"][0]["name"]


def _seconds(duration: str) -> float:
    """A compose duration such as "25s" or "1m30s" in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


def test_kustomize_renders_manifests_that_the_kubernetes_api_schemas_accept() -> None:
    """``kubectl kustomize deploy/k8s`` (what ``kubectl apply -k`` sends), every object validated
    strictly (no unknown fields) against the Kubernetes API's OpenAPI schemas of the newest
    version kubernetes-validate ships."""
    rendered = subprocess.run([binary("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in documents} == {
        ("Deployment", "lstmd"), ("Service", "lstmd"), ("Service", "lstmd-headless"),
        ("StatefulSet", "lstmd-redis"), ("Service", "lstmd-redis")}  # fmt: skip
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)  # raises ValidationError
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lstmd"


def test_the_schema_check_catches_a_misspelt_field() -> None:
    """So the test above can fail: a field the API does not know is refused."""
    deployment = next(d for d in yaml.safe_load_all((K8S / "lstmd.yaml").read_text()) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
