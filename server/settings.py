"""All server settings in one place.

Each field can be set by a command-line flag (``--max-sessions``) or an environment variable
with the ``LSTMD_`` prefix (``LSTMD_MAX_SESSIONS``); a flag wins over the environment, which
wins over the default. The CLI only chooses settings; nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

BUNDLED_MODELS = Path(__file__).parent / "models"


T = TypeVar("T")


def _setting(default: T, help: str, choices: Sequence[str] | None = None, secret: bool = False) -> T:
    """A field with its help text. A ``secret`` one is left out of the repr and of ``--help``'s
    defaults, so its value (read from the environment) is never printed."""
    return field(default=default, repr=not secret, metadata={"help": help, "choices": choices, "secret": secret})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("[::]", "address to bind the gRPC server to")
    port: int = _setting(50051, "gRPC port (0 picks a free one)")
    health_port: int = _setting(
        -1,
        "also serve the gRPC health service alone, in plaintext, on this port of --health-host (-1: off; 0: a "
        "free one): for container and kubelet probes, which speak neither TLS nor client certificates",
    )
    health_host: str = _setting("127.0.0.1", "address of --health-port (127.0.0.1: probes from inside the host)")
    metrics_port: int = _setting(9464, "Prometheus /metrics HTTP port (0 picks a free one, -1 disables)")
    metrics_host: str = _setting("", "address to bind the /metrics HTTP server to (empty: the same as --host)")
    models_dir: str = _setting(str(BUNDLED_MODELS), "folder holding one sub-folder per model")
    default_model: str = _setting("", "model used when a request names none (empty: the only or first model)")
    model_versions: str = _setting(
        "",
        "pinned versions, 'name=version' comma separated: new sessions of these models go to these versions "
        "instead of the newest (ReloadModels changes them)",
    )
    models_poll_s: float = _setting(
        0.0, "look for new version folders every this many seconds (0: only on SIGHUP and ReloadModels)"
    )
    version_drain_s: float = _setting(
        3600.0,
        "a version no longer served unloads when its last session ends, or this many seconds after it stopped "
        "being served; its sessions left then end ('unloaded')",
    )
    max_sessions: int = _setting(100_000, "most sessions held at once")
    at_capacity: str = _setting(
        "evict",
        "at max_sessions: 'evict' the least recently used idle session, or 'reject' new ones",
        ["evict", "reject"],
    )
    session_ttl_s: float = _setting(3600.0, "idle sessions expire after this many seconds")
    session_store: str = _setting(
        "memory",
        "where sessions live: 'memory' (this process) or 'redis://host:port/db', shared by every replica "
        "(needs the redis extra: pip install 'lstmd[redis]')",
    )
    sweep_interval_s: float = _setting(10.0, "how often the sweeper looks for expired sessions")
    session_max_lifetime_s: float = _setting(
        0.0, "sessions end this many seconds after they were created, however much they are used (0: no limit)"
    )
    ended_sessions_kept: int = _setting(
        100_000, "ended sessions whose reason and time a NOT_FOUND reports (the oldest are forgotten first)"
    )
    max_batch_size: int = _setting(256, "most single-token steps run in one ONNX Runtime call")
    max_batch_wait_ms: float = _setting(
        1.0, "how long a step may wait for company, only while other steps are in flight"
    )
    default_top_k: int = _setting(5, "candidates per prediction when the request and session name none")
    max_top_k: int = _setting(100, "largest top_k a request may ask for")
    word_beam: int = _setting(8, "hypotheses the word search keeps per step (subword and character models)")
    word_max_tokens: int = _setting(24, "most tokens of one word the word search follows")
    max_feed_tokens: int = _setting(4096, "most tokens in one feed")
    max_feed_items: int = _setting(1024, "most feeds in one FeedMany message")
    max_text_chars: int = _setting(
        100_000, "longest text in one feed or prompt, in characters (words tokenizer: also once Unicode-normalised)"
    )
    max_message_bytes: int = _setting(1 << 20, "largest gRPC message the server accepts, in bytes")
    max_concurrent_calls: int = _setting(
        1000,
        "most calls and streams in flight at once (health checks aside); beyond it calls are refused at once "
        "with RESOURCE_EXHAUSTED and a retry hint",
    )
    max_generate_tokens: int = _setting(1024, "largest max_tokens a Generate may ask for")
    generate_write_timeout_s: float = _setting(
        10.0,
        "how long a generated token may wait for the client to read it; then the generation ends "
        "DEADLINE_EXCEEDED, applying nothing, and frees its session",
    )
    intra_op_threads: int = _setting(
        1, "ONNX Runtime intra-op threads (0: one per core); 1 leaves the other cores to gRPC and Python"
    )
    graph_optimization: str = _setting(
        "all", "ONNX Runtime graph optimisation level", ["disable", "basic", "extended", "all"]
    )
    providers: str = _setting("cpu", "ONNX Runtime execution providers, comma separated: cpu, cuda")
    drain_s: float = _setting(
        0.0,
        "on SIGTERM, seconds the health service says NOT_SERVING while calls are still served, before the "
        "listener closes: time for load balancers and probes to stop routing here (a second signal skips it)",
    )
    grace_s: float = _setting(10.0, "on SIGTERM, seconds in-flight calls get to finish")
    snapshot_dir: str = _setting(
        "", "folder for the session snapshot: written at shutdown, restored at start (empty: sessions are not kept)"
    )
    snapshot_interval_s: float = _setting(
        0.0, "also write the snapshot every this many seconds: a crash loses at most that (0: only at shutdown)"
    )
    log_level: str = _setting("info", "log level", ["debug", "info", "warning", "error"])
    log_format: str = _setting("text", "log line format", ["text", "json"])
    tls_cert_file: str = _setting("", "PEM certificate chain of the server; with --tls-key-file turns on TLS")
    tls_key_file: str = _setting("", "PEM private key of --tls-cert-file")
    tls_client_ca_file: str = _setting(
        "", "PEM CA certificates: clients must present a certificate they signed (mutual TLS)"
    )
    api_keys_file: str = _setting(
        "", "file of API keys, one '[name:]key' a line, '#' comments; any key turns on API-key checks"
    )
    api_keys: str = _setting(
        "", "API keys, comma separated, each '[name:]key' (prefer the environment variable to the flag)", secret=True
    )
    max_sessions_per_key: int = _setting(0, "with API keys: most sessions one key may hold at once (0: no limit)")
    admin_keys: str = _setting(
        "", "with API keys: names of the keys that may make admin calls (ReloadModels), comma separated"
    )
    session_keys: str = _setting(
        "",
        "keys that sign (and encrypt) exported session blobs, comma separated, each at least 32 characters: the "
        "first signs, every one verifies (rotation); prefer the environment variable to the flag",
        secret=True,
    )
    session_keys_file: str = _setting("", "file of session keys, one a line, '#' comments; read before --session-keys")
    keyless_services: str = _setting(
        "health,reflection", "with API keys: services callable without one, comma separated: health, reflection"
    )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(
            prog="lstmd-server",
            description="Serve LSTM language models over gRPC. Every flag can also be set by the "
            "environment variable shown in brackets.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        values: dict[str, object] = {}
        for f in fields(cls):
            env = env_name(f.name)
            kind = type(f.default) if f.default is not MISSING else str
            default = f.default
            if f.metadata["secret"]:
                default = argparse.SUPPRESS  # never shown by --help; read from the environment below
            elif env in environ:
                try:
                    default = kind(environ[env])
                except ValueError:
                    parser.error(f"{env}={environ[env]!r} is not a valid {kind.__name__}")
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                default=default,
                choices=f.metadata["choices"],
                help=f"{f.metadata['help']} [{env}]",
            )
        args = parser.parse_args(argv)
        for f in fields(cls):
            values[f.name] = getattr(args, f.name, environ.get(env_name(f.name), f.default))
        settings = cls(**values)  # type: ignore[arg-type]
        problems = settings.problems()
        if problems:
            parser.error("; ".join(problems))
        return settings

    def problems(self) -> list[str]:
        out = []
        if self.health_port > 0 and self.health_port == self.port:
            out.append("--health-port must differ from --port")
        if self.max_sessions < 1:
            out.append("--max-sessions must be at least 1")
        if self.max_concurrent_calls < 1:
            out.append("--max-concurrent-calls must be at least 1")
        if self.max_batch_size < 1:
            out.append("--max-batch-size must be at least 1")
        if self.max_batch_wait_ms < 0:
            out.append("--max-batch-wait-ms must not be negative")
        if not 1 <= self.default_top_k <= self.max_top_k:
            out.append("--default-top-k must be between 1 and --max-top-k")
        if self.word_beam < 1 or self.word_max_tokens < 1:
            out.append("--word-beam and --word-max-tokens must be at least 1")
        if self.generate_write_timeout_s <= 0:
            out.append("--generate-write-timeout-s must be positive")
        if self.session_ttl_s <= 0 or self.sweep_interval_s <= 0:
            out.append("--session-ttl-s and --sweep-interval-s must be positive")
        if self.drain_s < 0 or self.version_drain_s < 0 or self.models_poll_s < 0:
            out.append("--drain-s, --version-drain-s and --models-poll-s must not be negative")
        if self.session_max_lifetime_s < 0:
            out.append("--session-max-lifetime-s must not be negative (0: no limit)")
        if self.ended_sessions_kept < 0:
            out.append("--ended-sessions-kept must not be negative")
        if any("=" not in pin for pin in filter(None, self.model_versions.split(","))):
            out.append("--model-versions takes 'name=version' pairs, comma separated")
        if self.snapshot_interval_s < 0:
            out.append("--snapshot-interval-s must not be negative")
        if self.snapshot_interval_s and not self.snapshot_dir:
            out.append("--snapshot-interval-s needs --snapshot-dir")
        if self.session_store != "memory" and not self.session_store.startswith(("redis://", "rediss://")):
            out.append("--session-store takes 'memory' or a redis://host:port/db URL")
        if self.session_store != "memory" and self.snapshot_dir:
            out.append("--snapshot-dir is for the memory store; with Redis the sessions persist in Redis")
        if set(self.providers.split(",")) - {"cpu", "cuda"}:
            out.append("--providers takes a comma-separated list of: cpu, cuda")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            out.append("--tls-cert-file and --tls-key-file go together: give both, or neither for plaintext")
        if self.tls_client_ca_file and not self.tls_cert_file:
            out.append("--tls-client-ca-file (mutual TLS) needs TLS: give --tls-cert-file and --tls-key-file too")
        if self.max_sessions_per_key < 0:
            out.append("--max-sessions-per-key must not be negative (0: no limit)")
        if set(filter(None, self.keyless_services.split(","))) - {"health", "reflection"}:
            out.append("--keyless-services takes a comma-separated list of: health, reflection (or nothing)")
        return out


def env_name(setting: str) -> str:
    return "LSTMD_" + setting.upper()
