"""Durable sessions: every session goes to the snapshot at shutdown (and every
``snapshot_interval_s``) and comes back at start, with its id; so do the records of why sessions
ended (server.endings), or a session deleted before a restart would be reported lost at it.

The file format and the atomic write are in server.snapshot_format; this module decides what goes
in and what may come back. A session comes back on the model version it was snapshotted on: one
no longer served is loaded again from its folder, draining (server.versions), when the folder is
still there. A session of a model this server does not serve, of a version whose folder is gone,
or with another state shape is refused, with a log line naming it, and the others load. No
snapshot problem stops the server: a failed write is an ERROR log line and
``lstmd_snapshot_failures_total``, and a file that cannot be read, or a path that is not a
regular file (a FIFO would block start-up), is set aside (``<name>.corrupt-<time>``,
``.unsupported-<time>``, ``.not-a-file-<time>``) and the server starts without sessions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lstmd.server import metrics, snapshot_format
from lstmd.server.endings import Ending
from lstmd.server.exactly_once import record_from_json, record_to_json
from lstmd.server.memory_store import MemorySessionStore
from lstmd.server.registry import Model, ModelRegistry
from lstmd.server.sessions import Session, unfit
from lstmd.server.settings import Settings
from lstmd.server.snapshot_format import SessionRecord, SnapshotError

log = logging.getLogger(__name__)
FILE_NAME = "sessions.snap"


class Snapshots:
    def __init__(self, settings: Settings, store: MemorySessionStore, registry: ModelRegistry):
        self.path = Path(settings.snapshot_dir) / FILE_NAME
        self.interval_s = settings.snapshot_interval_s
        self._store = store
        self._registry = registry
        self._stopping = asyncio.Event()
        self._periodic: asyncio.Task[None] | None = None

    def restore(self, load: Callable[[str, str], Model | None] = lambda name, version: None) -> int:
        """Load the snapshot into the store, at start before serving; ``load(name, version)`` loads a
        version not served (Versions.load_draining). Returns how many sessions came back."""
        # Nothing else runs yet, and the sessions are all long-lived: the garbage collector would
        # only rescan them again and again (measured: a quarter of the time for 50,000 sessions).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._restore(load)
        finally:
            if collecting:
                gc.enable()

    def _restore(self, load: Callable[[str, str], Model | None]) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("cannot create the snapshot folder %s: %s; starting without sessions, and sessions will not "
                      "survive a restart", self.path.parent, e)  # fmt: skip
            return 0
        try:
            records, endings = snapshot_format.read_all(self.path)
        except FileNotFoundError:
            log.info("no session snapshot at %s: starting without sessions", self.path)
            return 0
        except SnapshotError as e:
            metrics.snapshot_files_refused.inc()
            try:
                where = f"moved it to {snapshot_format.set_aside(self.path, e.kind).name}"
            except OSError as moving:
                where = f"and could not move it aside ({moving})"
            log.error("refusing the session snapshot %s: %s; %s; starting without sessions", self.path, e, where)
            return 0
        except OSError as e:
            metrics.snapshot_files_refused.inc()
            log.error("cannot read the session snapshot %s: %s; starting without sessions", self.path, e)
            return 0
        accepted = []
        loaded: dict[tuple[str, str], Model | None] = {}  # each version not loaded is tried once
        for record in records:
            key = (record.model, record.model_version)
            if key not in loaded:
                loaded[key] = self._registry.find(*key) or load(*key)
            model = loaded[key]
            refusal = self._refusal(record, model)
            if refusal is None and model is not None:
                try:
                    accepted.append(_session(record, model))
                    continue
                except (KeyError, TypeError, ValueError) as e:
                    refusal = f"malformed exactly-once record ({e!r})"
            log.warning("session %s not restored: %s", record.id, refusal)
        excess = max(0, len(accepted) - self._store.max_sessions)
        if excess:
            log.warning("the session snapshot holds %d sessions this server can take, more than --max-sessions %d: "
                        "the %d least recently used are not restored", len(accepted), self._store.max_sessions,
                        excess)  # fmt: skip
        for ending in endings:
            self._store.endings.add(ending)
        restored = 0
        for session in accepted[excess:]:
            if self._store.restore(session):
                restored += 1
            else:
                log.warning("session %s not restored: a session with this id is already here", session.id)
        metrics.snapshot_sessions_restored.inc(restored)
        metrics.snapshot_sessions_refused.inc(len(records) - restored)
        log.info("restored %d of %d sessions (and %d records of ended ones) from %s", restored, len(records),
                 len(endings), self.path)  # fmt: skip
        return restored

    def _refusal(self, record: SessionRecord, model: Model | None) -> str | None:
        """Why a record must not be loaded into ``model``, its version (None: not loaded), or None."""
        held = f"the snapshot holds it for model {record.model!r} version {record.model_version!r}"
        served = self._registry.models.get(record.model)
        if served is None:
            return f"{held}, which this server does not serve (it serves {', '.join(sorted(self._registry.models))})"
        if model is None:
            return (f"{held}, whose folder is not in the models directory (this server serves {served.name!r} "
                    f"version {served.version!r})")  # fmt: skip
        fault = unfit(model, record.state.shape, record.last_token, record.position)
        return None if fault is None else f"{held} with {fault}"

    async def start(self) -> None:
        if self.interval_s > 0:
            self._periodic = asyncio.get_running_loop().create_task(self._write_forever(), name="session-snapshots")

    async def stop(self) -> None:
        """Write the final snapshot; call once no more calls run (after the gRPC server stopped)."""
        self._stopping.set()
        if self._periodic:
            await self._periodic  # lets a periodic write in progress finish first
        await self.write(final=True)

    async def _write_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                return
            except TimeoutError:
                await self.write(final=False)

    async def write(self, final: bool) -> bool:
        """Snapshot every session. The loop only collects references (a session's arrays are replaced
        on every step, never written in place); encoding and the file work run in a thread. A failure
        is logged and counted, never raised: the server keeps serving."""
        started = time.perf_counter()
        records = [_record(s) for s in self._store.all()]
        endings = self._store.endings.all()
        try:
            size = await asyncio.get_running_loop().run_in_executor(None, _write, self.path, records, endings)
        except Exception as e:
            metrics.snapshot_failures.inc()
            log.error("cannot write the session snapshot %s: %s; still serving, but %d sessions would not survive "
                      "a restart", self.path, e, len(records), exc_info=not isinstance(e, OSError))  # fmt: skip
            return False
        seconds = time.perf_counter() - started
        metrics.snapshot_write_seconds.observe(seconds)
        metrics.snapshot_last_success.set(time.time())
        metrics.snapshot_sessions_written.inc(len(records))
        log.log(logging.INFO if final else logging.DEBUG, "wrote %d sessions to %s (%d bytes, %.3f s)",
                len(records), self.path, size, seconds)  # fmt: skip
        return True


def _write(path: Path, records: list[SessionRecord], endings: list[Ending]) -> int:
    """In a thread: write the file, turning each exactly-once record into JSON just before it is
    encoded (so the JSON objects never pile up and make the garbage collector scan every object
    while it holds the GIL: measured, that stalled the event loop for over 100 ms)."""
    with_json = (replace(r, last_request=record_to_json(r.last_request)) for r in records)
    return snapshot_format.write(path, with_json, len(records), endings)


def _record(s: Session) -> SessionRecord:
    """The session's current values, by reference; ``last_request`` is converted later, in the writer's thread."""
    return SessionRecord(s.id, s.model.name, s.model.version, s.top_k, s.last_token, s.position, s.created,
                         s.last_used, s.owner, s.state, s.prev_state, s.last_request)  # fmt: skip


def _session(r: SessionRecord, model: Model) -> Session:
    return Session(r.id, model, r.top_k, r.state, r.prev_state, r.last_token, r.position, r.created,
                   r.last_used, record_from_json(r.last_request, r.id), owner=r.owner)  # fmt: skip
