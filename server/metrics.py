"""Every Prometheus metric the server exports, defined once. Labels are low-cardinality
(model, version, method, code, phase): never a session id. A model version's label sets are
removed when it unloads (``forget``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Sub-millisecond to seconds: a single-token step takes ~0.1-10 ms, a long prompt or a
# Generate call up to seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_RPC = ("grpc_type", "grpc_service", "grpc_method")
rpc_started = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC)
rpc_handled = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", (*_RPC, "grpc_code")
)
rpc_seconds = Histogram(
    "grpc_server_handling_seconds", "Time from the start of an RPC to its end.", _RPC, buckets=LATENCY_BUCKETS
)
calls_in_flight = Gauge(
    "lstmd_calls_in_flight", "Calls and streams in flight, as counted against --max-concurrent-calls (health aside)."
)
calls_refused = Counter(
    "lstmd_calls_refused_total", "Calls refused with RESOURCE_EXHAUSTED because --max-concurrent-calls were in flight."
)

_VERSION = ("model", "version")
batch_size = Histogram(
    "lstmd_batch_size", "Sequences per ONNX Runtime call.", (*_VERSION, "phase"), buckets=BATCH_BUCKETS
)
queue_wait = Histogram(
    "lstmd_queue_wait_seconds", "Time a step waited for its ONNX Runtime call.", _VERSION, buckets=LATENCY_BUCKETS
)
inference_seconds = Histogram(
    "lstmd_inference_seconds", "Duration of one ONNX Runtime call.", (*_VERSION, "phase"), buckets=LATENCY_BUCKETS
)
tokens = Counter(
    "lstmd_tokens_total", "Tokens run through a model version, by phase (prompt or step).", (*_VERSION, "phase")
)
sessions_active = Gauge("lstmd_sessions_active", "Sessions held (with Redis: by all replicas together).")
sessions_created = Counter("lstmd_sessions_created_total", "Sessions created (forks and stream sessions included).")
sessions_deleted = Counter("lstmd_sessions_deleted_total", "Sessions deleted by clients or freed at stream end.")
sessions_expired = Counter("lstmd_sessions_expired_total", "Sessions removed after their idle time-to-live.")
sessions_evicted = Counter("lstmd_sessions_evicted_total", "Idle sessions evicted to make room at the session limit.")
sessions_unloaded = Counter(
    "lstmd_sessions_unloaded_total", "Sessions ended because their model version was unloaded at its drain deadline."
)
sessions_ended = Counter(
    "lstmd_sessions_ended_total", "Sessions ended, by the reason their NOT_FOUND reports.", ("reason",)
)
_BY_REASON = {"deleted": sessions_deleted, "expired": sessions_expired, "evicted": sessions_evicted,
              "unloaded": sessions_unloaded}  # fmt: skip


def count_ending(reason: str) -> None:
    """A session ended: lstmd_sessions_ended_total, and the older counter of its reason where it has one."""
    sessions_ended.labels(reason).inc()
    if reason in _BY_REASON:
        _BY_REASON[reason].inc()


model_info = Gauge(
    "lstmd_model_info", "Model versions loaded (value 1), served or draining.", (*_VERSION, "precision", "default")
)
model_sessions = Gauge(
    "lstmd_model_sessions", "Sessions of a loaded model version (with Redis: by all replicas together).", _VERSION
)
snapshot_write_seconds = Histogram(
    "lstmd_snapshot_write_seconds", "Time to write one session snapshot (serialise, fsync, rename).",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
snapshot_failures = Counter("lstmd_snapshot_failures_total", "Session snapshot writes that failed.")
snapshot_last_success = Gauge(
    "lstmd_snapshot_last_success_timestamp_seconds", "When the last session snapshot was written (0: never)."
)
snapshot_sessions_written = Counter("lstmd_snapshot_sessions_written_total", "Sessions written to snapshots.")
snapshot_sessions_restored = Counter("lstmd_snapshot_sessions_restored_total", "Sessions restored from a snapshot.")
snapshot_sessions_refused = Counter(
    "lstmd_snapshot_sessions_refused_total",
    "Sessions in a snapshot not restored: another model version, a model not served, or no room.",
)
snapshot_files_refused = Counter(
    "lstmd_snapshot_files_refused_total", "Snapshot files refused at start (corrupt, truncated, unknown format)."
)
store_round_trip_seconds = Histogram(
    "lstmd_store_round_trip_seconds", "One pipelined round trip to the shared session store (Redis), by operation.",
    ("op",), buckets=LATENCY_BUCKETS,
)  # fmt: skip
store_batch_size = Histogram(
    "lstmd_store_batch_size", "Sessions read or written in one round trip to the shared store.", ("op",),
    buckets=BATCH_BUCKETS,
)  # fmt: skip
store_conflicts = Counter(
    "lstmd_store_conflicts_total",
    "Steps whose write lost the compare-and-set: another replica advanced the session first; discarded and re-read.",
)
store_errors = Counter("lstmd_store_errors_total", "Calls refused because the shared session store was unreachable.")


def forget(name: str, version: str, precision: str, default: bool) -> None:
    """Remove an unloaded model version's label sets: a scrape shows loaded versions only."""
    model_info.remove(name, version, precision, str(default).lower())
    model_sessions.remove(name, version)
    queue_wait.remove(name, version)
    for phase in ("step", "prompt"):
        for metric in (batch_size, inference_seconds, tokens):
            metric.remove(name, version, phase)
