#!/usr/bin/env bash
# Smoke test of the real deployment: build the image, bring up lstmd and Prometheus with
# docker-compose, wait for health, predict and run a short load through the published port,
# then ask Prometheus that it scrapes lstmd and counted the tokens, and check that a session
# survives `docker-compose restart lstmd` (the snapshot volume). Then the scale-out variant
# (deploy/docker-compose.scale.yml): nginx in front of two replicas sharing Redis; a session fed
# through nginx survives restarting a replica and then Redis, and answers as a fresh session fed
# the same text does, bit for bit. Tears down on any exit.
# Needs root (docker) and the project's virtual environment (for the lstmd CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
lstmd=${LSTMD_CLI:-.venv/bin/lstmd}
python=${LSTMD_PYTHON:-.venv/bin/python}
project=lstmd-smoke
images=(python:3.11-slim prom/prometheus:v2.53.0 nginx:1.27 redis:7)

say() { printf '\n== smoke: %s ==\n' "$*"; }

if ! command -v docker-compose >/dev/null || ! docker info >/dev/null 2>&1 \
   || ! timeout 20 docker pull -q "${images[0]}" >/dev/null 2>&1; then
  say "no registry reachable: building local stand-ins for ${images[*]}"
  bash ../shared/docker/offline-images.sh "${images[@]}"
fi
compose=(docker-compose -p "$project" -f docker-compose.yml)
scale=(docker-compose -p "$project-scale" -f deploy/docker-compose.scale.yml)
down() { "$@" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap 'down "${compose[@]}"; down "${scale[@]}"' EXIT

say "build"
"${compose[@]}" build lstmd
docker image ls lstmd:latest --format 'image lstmd:latest: {{.Size}}'
docker run --rm --entrypoint sh lstmd:latest -c \
  '! python -c "import torch" 2>/dev/null && ! command -v gcc && ! test -e /opt/lstmd/tests && echo "runtime image: no torch, no compiler, no tests; runs as uid $(id -u)"'

wait_healthy() {  # [container id] (default: $container)
  local id=${1:-$container}
  for _ in $(seq 90); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
    [ "$status" = healthy ] && break
    sleep 1
  done
  echo "container $(docker inspect -f '{{.Name}}' "$id") health: $status"
  [ "$status" = healthy ] || { docker logs "$id" 2>&1 | tail -50; exit 1; }
}

say "up: lstmd and prometheus"
"${compose[@]}" up -d lstmd prometheus
container=$("${compose[@]}" ps -q lstmd)
wait_healthy

say "a TLS-only container (mutual TLS) reports healthy: its HEALTHCHECK uses the health port"
certs=$(mktemp -d) && chmod 755 "$certs"  # the image's user reads it
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$certs/server.key" \
  -out "$certs/server.pem" -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>/dev/null
chmod 644 "$certs/server.key"  # read by the image's user
tls=$(docker run -d -v "$certs:/certs:ro" -e LSTMD_TLS_CERT_FILE=/certs/server.pem \
  -e LSTMD_TLS_KEY_FILE=/certs/server.key -e LSTMD_TLS_CLIENT_CA_FILE=/certs/server.pem lstmd:latest)
wait_healthy "$tls"
docker rm -f "$tls" >/dev/null
rm -rf "$certs"

say "predict through the published port"
"$lstmd" predict "the clouds are in the" --target localhost:50051
say "bench: 8 streams x 50 tokens"
"$lstmd" bench --target localhost:50051 --streams 8 --tokens 50 --quiet

say "Prometheus"
query() { curl -sf --get "http://localhost:9090/api/v1/query" --data-urlencode "query=$1" \
            | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'; }
for _ in $(seq 60); do
  up=$(query 'up{job="lstmd"}' || echo none)
  tokens=$(query 'sum(lstmd_tokens_total{job="lstmd"})' || echo none)
  [ "$up" = 1 ] && [ "$tokens" != none ] && [ "${tokens%.*}" -ge 405 ] && break
  sleep 1
done
echo "up{job=\"lstmd\"} = $up"
echo "sum(lstmd_tokens_total{job=\"lstmd\"}) = $tokens (expected at least 405: 5 predicted + 400 bench tokens)"
[ "$up" = 1 ] && [ "${tokens%.*}" -ge 405 ] || { echo "smoke: Prometheus did not see lstmd as expected" >&2; exit 1; }

say "a session survives docker-compose restart lstmd"
session=$("$python" -c 'from lstmd.client import Client
with Client("localhost:50051") as lstmd:
    session = lstmd.create_session()
    session.feed("the clouds are in the")
    print(session.id)')
"${compose[@]}" restart lstmd
wait_healthy
"$python" - "$session" <<'EOF'
import sys
from lstmd.client import Client
with Client("localhost:50051") as lstmd:
    session = lstmd.get_session(sys.argv[1])
    assert session.position == 5, session.info
    print(f"session {session.id} restored at position {session.position}; next:", session.feed("sky").candidates[0])
EOF
"${compose[@]}" logs lstmd | grep -E 'restored [0-9]+ of [0-9]+ sessions'

say "graceful stop"
"${compose[@]}" stop -t 20 lstmd
echo "lstmd exit code: $(docker inspect -f '{{.State.ExitCode}}' "$container")"
[ "$(docker inspect -f '{{.State.ExitCode}}' "$container")" = 0 ]
down "${compose[@]}"

say "scale-out: nginx in front of two replicas sharing Redis"
"${scale[@]}" up -d
for replica in lstmd-1 lstmd-2; do wait_healthy "$("${scale[@]}" ps -q "$replica")"; done
session=$("$python" -c 'from lstmd.client import Client
with Client("localhost:50051") as lstmd:
    session = lstmd.create_session()
    session.feed("the clouds are in the")
    print(session.id)')
feeds=1
for service in lstmd-1 redis; do
  "${scale[@]}" restart "$service"
  [ "$service" = redis ] || wait_healthy "$("${scale[@]}" ps -q "$service")"
  "$python" deploy/smoke_session.py "$session" "$service" "$feeds"
  feeds=$((feeds + 1))
done
down "${scale[@]}"
say "passed"
