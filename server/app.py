"""Assembling and running the server: gRPC (lstmd, health, reflection), metrics over HTTP,
the engine, and graceful shutdown on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lstmd.server import metrics_http, reflection
from lstmd.server.engine import Engine
from lstmd.server.interceptors import (
    AdmissionInterceptor,
    AuthInterceptor,
    MalformedRequestInterceptor,
    MetricsInterceptor,
)
from lstmd.server.memory_store import MemorySessionStore
from lstmd.server.metrics_http import MetricsServer
from lstmd.server.registry import ModelRegistry
from lstmd.server.security import KeyRing, load_keys, load_session_keys, server_credentials
from lstmd.server.servicer import LstmdServicer
from lstmd.server.session_blob import SessionBlobs
from lstmd.server.session_ids import load_ids
from lstmd.server.sessions import SessionStore
from lstmd.server.settings import Settings
from lstmd.server.snapshot_policy import Snapshots
from lstmd.server.versions import Versions
from lstmd.v1 import lstmd_pb2, lstmd_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = lstmd_pb2.DESCRIPTOR.services_by_name["Lstmd"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
PENDING_CALLS = 10_000  # calls gRPC core holds for the event loop before it sheds any (see start)
KEYLESS = {"health": (HEALTH_SERVICE_NAME,), "reflection": reflection.SERVICE_NAMES}  # --keyless-services
# How long a thread waiting for the GIL waits before the running thread must hand it over (CPython's
# default is 5 ms). While a worker thread runs Python (tokenizing a long text, encoding a snapshot),
# the event loop waits that long each time it takes the GIL back, several times a call.
GIL_SWITCH_S = 0.001


@dataclass
class RunningServer:
    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    port: int
    metrics_http: MetricsServer | None
    versions: Versions
    snapshots: Snapshots | None = None
    health_only: tuple[grpc.aio.Server, int] | None = None  # --health-port: the server and its port

    @property
    def metrics_port(self) -> int:
        return self.metrics_http.port if self.metrics_http else -1

    async def stop(self, grace: float, drain_s: float = 0.0, skip_drain: asyncio.Event | None = None) -> None:
        """Health NOT_SERVING; keep serving calls for ``drain_s`` (until ``skip_drain`` is set), so that
        load balancers and probes see it and stop routing here before anything is refused; then refuse
        new calls, let in-flight calls finish within ``grace``, and write the session snapshot (when
        configured)."""
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            log.info("draining: health NOT_SERVING, still serving calls for %g s before the listener closes "
                     "(a second SIGTERM or Ctrl-C skips the rest)", drain_s)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((skip_drain or asyncio.Event()).wait(), drain_s)
        await self.server.stop(grace)
        if self.health_only:
            await self.health_only[0].stop(0)
        if self.snapshots:
            await self.snapshots.stop()
        await self.versions.stop()
        await self.engine.stop()
        if self.metrics_http:
            self.metrics_http.close()


async def start(settings: Settings, registry: ModelRegistry) -> RunningServer:
    """Start everything and return once the server accepts calls. Raises SecurityConfigError
    for unusable TLS files, API keys or session keys, before anything starts."""
    credentials = server_credentials(settings)
    keys = load_keys(settings)
    session_keys = load_session_keys(settings)
    store, snapshots = open_store(settings, registry)
    engine = Engine(settings, registry, store, SessionBlobs(session_keys) if session_keys else None)
    versions = Versions(settings, engine, _admins(settings, keys))
    if snapshots:
        snapshots.restore(versions.load_draining)
    await engine.start()
    await versions.start()
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Calls wait in gRPC core until the event loop takes them; over 1,000 waiting (its default) core
        # starts dropping them at random (CANCELLED; INTERNAL on streams), before admission control sees
        # them. Taking and refusing a call costs the loop little, so let core hold a burst this large.
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
    ]
    # Metrics first: it counts refused calls too. Then admission, so a flood is refused before anything
    # else runs; then API keys, so a caller without one learns nothing about the request it sent.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        MetricsInterceptor(),
        AdmissionInterceptor(settings.max_concurrent_calls, exempt=[HEALTH_SERVICE_NAME]),
    ]
    if keys:
        keyless = [service for name in settings.keyless_services.split(",") if name for service in KEYLESS[name]]
        interceptors.append(AuthInterceptor(keys, keyless))
    interceptors.append(MalformedRequestInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=options)
    lstmd_pb2_grpc.add_LstmdServicer_to_server(LstmdServicer(engine, versions), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable((SERVICE_NAME, HEALTH_SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    metrics_host, metrics_server = settings.metrics_host or settings.host, None
    if settings.metrics_port >= 0:
        metrics_server = metrics_http.start(metrics_host, settings.metrics_port)
    await server.start()
    if snapshots:
        await snapshots.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_only = await _serve_health_only(settings, health_servicer) if settings.health_port >= 0 else None
    running = RunningServer(server, engine, health_servicer, port, metrics_server, versions, snapshots, health_only)
    names = ", ".join(registry.models)
    log.info("serving %s on %s:%d, metrics on :%d/metrics (%s)", names, settings.host, port, running.metrics_port,
             f"bound to {metrics_host}" if metrics_server else "off")  # fmt: skip
    tls = "off" if not credentials else "on, client certificates required" if settings.tls_client_ca_file else "on"
    log.info("sessions in %s", store.describe())
    log.info("TLS %s; API keys %s", tls, f"on: {len(keys)} ({', '.join(k.id for k in keys.keys)})" if keys else "off")
    log.info("session export and import %s", f"on (session keys: {len(session_keys)})" if session_keys else
             "off (no LSTMD_SESSION_KEYS)")  # fmt: skip
    return running


def _admins(settings: Settings, keys: KeyRing | None) -> frozenset[str] | None:
    """The key ids that may make admin calls; None when keys are off (every caller may)."""
    if keys is None:
        return None
    admins = frozenset(filter(None, settings.admin_keys.split(",")))
    unknown = admins - {k.id for k in keys.keys}
    if unknown:
        log.warning("LSTMD_ADMIN_KEYS names %s, which no API key is named: no admin call can be made with them",
                    ", ".join(sorted(unknown)))  # fmt: skip
    return admins


async def _serve_health_only(settings: Settings, servicer: health.aio.HealthServicer) -> tuple[grpc.aio.Server, int]:
    """The health service (the same servicer: it turns NOT_SERVING at shutdown too) alone, in plaintext,
    on --health-host:--health-port, for probes that cannot speak the main port's TLS or present a
    client certificate. It serves nothing else, so it needs no API key either."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{settings.health_host}:{settings.health_port}")
    if port == 0:
        raise OSError(f"cannot bind --health-port {settings.health_host}:{settings.health_port}")
    await server.start()
    log.info("health service alone, in plaintext, on %s:%d", settings.health_host, port)
    return server, port


def open_store(settings: Settings, registry: ModelRegistry) -> tuple[SessionStore, Snapshots | None]:
    """The session store the settings name, and the snapshots of the memory store when configured.
    Snapshots are the memory store's alone: Redis keeps its sessions itself (the settings refuse both)."""
    ids = load_ids(settings)
    if settings.session_store == "memory":
        memory = MemorySessionStore(settings.max_sessions, settings.at_capacity, settings.session_ttl_s,
                                    settings.max_sessions_per_key, settings.sweep_interval_s,
                                    settings.session_max_lifetime_s, ids, settings.ended_sessions_kept)  # fmt: skip
        return memory, Snapshots(settings, memory, registry) if settings.snapshot_dir else None
    from lstmd.server.redis_store import RedisSessionStore  # the redis extra: only needed when configured

    return RedisSessionStore(settings.session_store, registry, settings.session_ttl_s, settings.max_sessions,
                             settings.max_sessions_per_key, settings.sweep_interval_s,
                             lifetime_s=settings.session_max_lifetime_s, ids=ids), None  # fmt: skip


async def run(settings: Settings, registry: ModelRegistry) -> None:
    """The server process: serve until SIGTERM or SIGINT, then stop gracefully. SIGHUP reloads the
    models folder (server.versions)."""
    sys.setswitchinterval(GIL_SWITCH_S)
    stopping, hurry = asyncio.Event(), asyncio.Event()  # the first signal, and a second one

    def on_signal() -> None:
        (hurry if stopping.is_set() else stopping).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    running = await start(settings, registry)
    loop.add_signal_handler(signal.SIGHUP, running.versions.reload_soon, "SIGHUP")
    await stopping.wait()
    log.info("shutting down: health NOT_SERVING; in-flight calls get up to %g s once the listener closes",
             settings.grace_s)  # fmt: skip
    await running.stop(settings.grace_s, settings.drain_s, hurry)
    log.info("stopped")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
