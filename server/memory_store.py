"""Sessions in this process (``--session-store memory``, the default): bounded, least recently
used first, expired when idle for longer than ``session_ttl_s``. Snapshots (server.snapshot_policy)
keep them across restarts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from typing import Any

from lstmd.server import metrics
from lstmd.server.errors import CapacityExceeded, NotFound
from lstmd.server.registry import Model
from lstmd.server.sessions import Session, SessionStore, check_id, id_taken, not_found, unloaded

log = logging.getLogger(__name__)


class MemorySessionStore(SessionStore):
    """All sessions, least recently used first. Bounded: at the limit a new session either
    evicts the least recently used idle one (``evict``) or is refused (``reject``).

    With API keys every session has an ``owner`` and the store holds at most ``max_per_owner``
    sessions per owner (0: no limit).

    The Sessions it hands out are the stored ones, so a step is stored as soon as the engine has
    computed it: ``commit`` only checks that the session was not deleted, expired or evicted while
    the step waited, and ``load`` refreshes nothing. All of it runs without suspending."""

    in_process = True

    def __init__(
        self, max_sessions: int, at_capacity: str, ttl_s: float, max_per_owner: int = 0, sweep_interval_s: float = 10.0,
        ended_kept: int = 10_000,
    ):  # fmt: skip
        self.max_sessions = max_sessions
        self.at_capacity = at_capacity
        self.ttl_s = ttl_s
        self.max_per_owner = max_per_owner
        self.sweep_interval_s = sweep_interval_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._owned: Counter[str] = Counter()  # sessions per owner
        self._per_model: Counter[Model] = Counter()  # sessions per model version
        # sessions ended by their version's unload: id -> (owner, model, version, when), the newest ``ended_kept``
        self._ended: OrderedDict[str, tuple[str, str, str, float]] = OrderedDict()
        self._ended_kept = ended_kept
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    # the interface the engine uses

    async def create(self, model: Model, top_k: int, owner: str) -> Session:
        self._make_room(owner)
        return self._add(Session.new(model, top_k, owner))

    async def fork(self, source: Session) -> Session:
        self._make_room(source.owner)
        return self._add(source.fork())

    async def insert(self, session: Session) -> None:
        if session.id in self._sessions:
            raise id_taken(session.id)
        self._make_room(session.owner)
        self._add(session)

    async def get(self, session_id: str, owner: str) -> Session:
        check_id(session_id)
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            ended = self._ended.get(session_id)
            if session is None and ended is not None and ended[0] == owner:
                raise unloaded(session_id, *ended[1:])
            raise not_found(session_id, self.ttl_s)
        return session

    async def delete(self, session_id: str, owner: str) -> None:
        self._remove(await self.get(session_id, owner), metrics.sessions_deleted)

    async def discard(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            self._remove(session, metrics.sessions_deleted)

    async def load(self, session: Session) -> None:
        self._check_held(session)

    async def position(self, session: Session) -> int | None:
        return session.position if self._sessions.get(session.id) is session else None

    async def commit(self, session: Session, read_position: int, with_request: bool) -> bool:
        self._check_held(session)
        return True

    def touch(self, session: Session) -> None:
        session.last_used = time.time()
        if session.id in self._sessions:
            self._sessions.move_to_end(session.id)

    async def count(self, model: Model) -> int:
        return self._per_model[model]

    async def end_version(self, model: Model, when: float) -> int:
        # A minimal record of why: the store's general record of ended sessions can take these over.
        ending = [s for s in self._sessions.values() if s.model is model and not s.busy()]
        for session in ending:
            self._remove(session, metrics.sessions_unloaded)
            self._ended[session.id] = (session.owner, model.name, model.version, when)
        while len(self._ended) > self._ended_kept:
            self._ended.popitem(last=False)
        if ending:
            log.warning("ended %d sessions of %s version %s: it was unloaded after its drain", len(ending), model.name,
                        model.version)  # fmt: skip
        return self._per_model[model]

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="session-sweeper")

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    def describe(self) -> str:
        return "memory (this process)"

    # for snapshots

    def restore(self, session: Session) -> bool:
        """Add a session from a snapshot, keeping its id, as the most recently used. False when full."""
        if len(self._sessions) >= self.max_sessions or session.id in self._sessions:
            return False
        self._sessions[session.id] = session
        self._owned[session.owner] += 1
        self._per_model[session.model] += 1
        metrics.sessions_active.set(len(self._sessions))
        return True

    def all(self) -> list[Session]:
        """Every session, least recently used first."""
        return list(self._sessions.values())

    # expiry and capacity

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.sweep()

    def sweep(self) -> int:
        """Remove sessions idle for longer than the TTL. Returns how many."""
        cutoff = time.time() - self.ttl_s
        expired = [s for s in self._sessions.values() if s.last_used < cutoff and not s.busy()]
        for session in expired:
            self._remove(session, metrics.sessions_expired)
        if expired:
            log.info("expired %d idle sessions (%d left)", len(expired), len(self._sessions))
        return len(expired)

    def _check_held(self, session: Session) -> None:
        if self._sessions.get(session.id) is not session:
            raise NotFound(f"session {session.id} was deleted or expired while this request waited")

    def _add(self, session: Session) -> Session:
        self._sessions[session.id] = session
        self._owned[session.owner] += 1
        self._per_model[session.model] += 1
        metrics.sessions_created.inc()
        metrics.sessions_active.set(len(self._sessions))
        return session

    def _remove(self, session: Session, counter: Any) -> None:
        del self._sessions[session.id]
        self._owned[session.owner] -= 1
        self._per_model[session.model] -= 1
        if not self._per_model[session.model]:
            del self._per_model[session.model]  # an unloaded version is forgotten
        counter.inc()
        metrics.sessions_active.set(len(self._sessions))

    def _make_room(self, owner: str) -> None:
        if owner and self.max_per_owner and self._owned[owner] >= self.max_per_owner:
            raise CapacityExceeded(
                f"API key {owner!r} holds its maximum of {self.max_per_owner} sessions: delete sessions it no "
                "longer needs (DeleteSession), or ask the server's operator to raise --max-sessions-per-key"
            )
        if len(self._sessions) < self.max_sessions:
            return
        if self.at_capacity == "evict":
            victim = next((s for s in self._sessions.values() if not s.busy()), None)  # least recently used first
            if victim is not None:
                self._remove(victim, metrics.sessions_evicted)
                log.info("evicted idle session %s… to make room (limit %d)", victim.id[:8], self.max_sessions)
                return
        raise CapacityExceeded(
            f"the server holds its maximum of {self.max_sessions} sessions"
            + (" and all are in use" if self.at_capacity == "evict" else "")
            + ": delete sessions you no longer need, or retry later"
        )
