"""Sessions in this process (``--session-store memory``, the default): bounded, least recently
used first, expired when idle for longer than ``session_ttl_s``, ended at ``session_max_lifetime_s``.
Every removal is recorded (server.endings) with its reason. Snapshots (server.snapshot_policy) keep
sessions and records across restarts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict

from lstmd.server import metrics
from lstmd.server.endings import Ending, Endings
from lstmd.server.errors import CapacityExceeded, NotFound
from lstmd.server.registry import Model
from lstmd.server.session_ids import SessionIds
from lstmd.server.sessions import Session, SessionStore, check_id, id_taken, not_found, session_ended

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
        lifetime_s: float = 0.0, ids: SessionIds | None = None, endings_kept: int = 100_000,
    ):  # fmt: skip
        self.max_sessions = max_sessions
        self.at_capacity = at_capacity
        self.ttl_s = ttl_s
        self.max_per_owner = max_per_owner
        self.sweep_interval_s = sweep_interval_s
        self.lifetime_s = lifetime_s
        self.ids = ids or SessionIds.per_process()
        self.endings = Endings(endings_kept)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._owned: Counter[str] = Counter()  # sessions per owner
        self._per_model: Counter[Model] = Counter()  # sessions per model version
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    # the interface the engine uses

    async def create(self, model: Model, top_k: int, owner: str) -> Session:
        self._make_room(owner)
        return self._add(Session.new(self.ids.new(owner), model, top_k, owner))

    async def fork(self, source: Session) -> Session:
        self._make_room(source.owner)
        return self._add(source.fork(self.ids.new(source.owner)))

    async def insert(self, session: Session) -> None:
        if session.id in self._sessions:
            raise id_taken(session.id)
        self._make_room(session.owner)
        self._add(session)

    async def get(self, session_id: str, owner: str) -> Session:
        check_id(session_id)
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner or not self._held(session):
            raise self._gone(session_id, owner)
        return session

    async def delete(self, session_id: str, owner: str) -> None:
        self._remove(await self.get(session_id, owner), "deleted")

    async def end(self, session: Session, reason: str, at_position: int | None = None) -> bool:
        if self._sessions.get(session.id) is not session:
            return True
        if at_position is not None and session.position != at_position:
            return False
        self._remove(session, reason)
        return True

    async def discard(self, session: Session) -> None:
        await self.end(session, "deleted")

    async def load(self, session: Session) -> None:
        self._check_held(session)

    async def position(self, session: Session) -> int | None:
        return session.position if self._held(session) else None

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
        ending = [s for s in self._sessions.values() if s.model is model and not s.busy()]
        for session in ending:
            self._remove(session, "unloaded", when)
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
        """End idle sessions past the TTL ("expired") or their lifetime ("lifetime"). Returns how many."""
        now = time.time()
        cutoff = now - self.ttl_s
        ended = [(s, "lifetime" if s.past_lifetime(self.lifetime_s, now) else "expired")
                 for s in self._sessions.values()
                 if not s.busy() and (s.last_used < cutoff or s.past_lifetime(self.lifetime_s, now))]  # fmt: skip
        for session, reason in ended:
            self._remove(session, reason)
        if ended:
            log.info("ended %d idle sessions past their idle TTL or lifetime (%d left)", len(ended),
                     len(self._sessions))  # fmt: skip
        return len(ended)

    def _held(self, session: Session) -> bool:
        """Whether the store holds ``session``; one past its lifetime is ended here, and is not."""
        if self._sessions.get(session.id) is not session:
            return False
        if session.past_lifetime(self.lifetime_s, time.time()):
            self._remove(session, "lifetime")
            return False
        return True

    def _check_held(self, session: Session) -> None:
        if not self._held(session):
            ending = self.endings.get(session.id)
            if ending is not None:
                raise session_ended(session.id, ending.reason, ending.when, self.ttl_s, self.lifetime_s)
            raise NotFound(f"session {session.id} was deleted or expired while this request waited")

    def _gone(self, session_id: str, owner: str) -> NotFound:
        """The NOT_FOUND of an id the store does not hold for ``owner``: why it ended, when that is the
        caller's own session and known; else the plain one, the same whatever the id is."""
        ending = self.endings.get(session_id)
        if ending is not None and ending.owner == owner:
            return session_ended(session_id, ending.reason, ending.when, self.ttl_s, self.lifetime_s)
        if ending is None and self.ids.from_earlier_run(session_id, owner):
            return session_ended(session_id, "restart", self.ids.started, self.ttl_s, self.lifetime_s)
        return not_found(session_id, self.ttl_s)

    def _add(self, session: Session) -> Session:
        self._sessions[session.id] = session
        self._owned[session.owner] += 1
        self._per_model[session.model] += 1
        metrics.sessions_created.inc()
        metrics.sessions_active.set(len(self._sessions))
        return session

    def _remove(self, session: Session, reason: str, when: float | None = None) -> None:
        del self._sessions[session.id]
        self._owned[session.owner] -= 1
        self._per_model[session.model] -= 1
        if not self._per_model[session.model]:
            del self._per_model[session.model]  # an unloaded version is forgotten
        self.endings.add(Ending(session.id, reason, time.time() if when is None else when, session.owner))
        metrics.count_ending(reason)
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
                self._remove(victim, "evicted")
                log.info("evicted idle session %s… to make room (limit %d)", victim.id[:8], self.max_sessions)
                return
        raise CapacityExceeded(
            f"the server holds its maximum of {self.max_sessions} sessions"
            + (" and all are in use" if self.at_capacity == "evict" else "")
            + ": delete sessions you no longer need, or retry later"
        )
