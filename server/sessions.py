"""Sessions: each one text's LSTM state on the server, and the bounded store that holds them."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lstmd.server import metrics
from lstmd.server.errors import CapacityExceeded, InvalidInput, NotFound
from lstmd.server.registry import Model

log = logging.getLogger(__name__)
_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(eq=False, slots=True)  # slots: 100k idle sessions must fit in 1 GiB
class Session:
    """One text's state. Besides (h, c) after the last token it keeps the state before that token,
    so the distribution of the next word can be recomputed (for Generate without a prompt and for
    the log-probability of a feed's first token) without storing a vocabulary-sized vector."""

    id: str
    model: Model
    top_k: int
    state: np.ndarray  # (2, layers, hidden): h and c after the last token
    prev_state: np.ndarray  # (2, layers, hidden): before the last token
    last_token: int
    position: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    last_request: tuple[Any, Any] | None = None  # (request key, its answer): exactly-once replays
    users: int = 0  # open streams and calls using it: never expired or evicted while > 0
    owner: str = ""  # id of the API key that created it ("" when keys are off)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # feeds apply one at a time, in order

    def busy(self) -> bool:
        return self.users > 0 or self.lock.locked()


class SessionStore:
    """All sessions, least recently used first. Bounded: at the limit a new session either
    evicts the least recently used idle one (``evict``) or is refused (``reject``).

    With API keys every session has an ``owner``: the store shows a session only to its owner
    (to anyone else it does not exist), and holds at most ``max_per_owner`` sessions per owner
    (0: no limit)."""

    def __init__(self, max_sessions: int, at_capacity: str, ttl_s: float, max_per_owner: int = 0):
        self.max_sessions = max_sessions
        self.at_capacity = at_capacity
        self.ttl_s = ttl_s
        self.max_per_owner = max_per_owner
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._owned: Counter[str] = Counter()  # sessions per owner

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, model: Model, top_k: int, owner: str) -> Session:
        self._make_room(owner)
        state, prev_state, last_token = model.initial_state()
        session = Session(secrets.token_hex(16), model, top_k, state, prev_state, last_token, owner=owner)
        return self._add(session)

    def fork(self, source: Session) -> Session:
        """A copy of ``source``, owned by the same key."""
        self._make_room(source.owner)
        copy = Session(
            secrets.token_hex(16), source.model, source.top_k, source.state.copy(), source.prev_state.copy(),
            source.last_token, source.position, owner=source.owner,
        )  # fmt: skip
        return self._add(copy)

    def restore(self, session: Session) -> bool:
        """Add a session from a snapshot, keeping its id, as the most recently used. False when full."""
        if len(self._sessions) >= self.max_sessions or session.id in self._sessions:
            return False
        self._sessions[session.id] = session
        self._owned[session.owner] += 1
        metrics.sessions_active.set(len(self._sessions))
        return True

    def all(self) -> list[Session]:
        """Every session, least recently used first."""
        return list(self._sessions.values())

    def get(self, session_id: str, owner: str) -> Session:
        """The session, if ``owner`` owns it. Another owner's session gets the very same NotFound
        as a missing one, so a caller cannot even learn that it exists."""
        if not _ID.fullmatch(session_id):
            raise InvalidInput(f"malformed session id {session_id[:40]!r}: expected 32 lowercase hex characters")
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(
                f"session {session_id} not found: it was deleted, expired after {self.ttl_s:g} s idle, "
                "or was evicted; create a new one"
            )
        return session

    def touch(self, session: Session) -> None:
        session.last_used = time.time()
        if session.id in self._sessions:
            self._sessions.move_to_end(session.id)

    def delete(self, session_id: str, owner: str) -> None:
        self._remove(self.get(session_id, owner), metrics.sessions_deleted)

    def discard(self, session: Session) -> None:
        """Remove a session if it is still here (ephemeral sessions at stream end)."""
        if self._sessions.get(session.id) is session:
            self._remove(session, metrics.sessions_deleted)

    def contains(self, session: Session) -> bool:
        return self._sessions.get(session.id) is session

    def sweep(self) -> int:
        """Remove sessions idle for longer than the TTL. Returns how many."""
        cutoff = time.time() - self.ttl_s
        expired = [s for s in self._sessions.values() if s.last_used < cutoff and not s.busy()]
        for session in expired:
            self._remove(session, metrics.sessions_expired)
        if expired:
            log.info("expired %d idle sessions (%d left)", len(expired), len(self._sessions))
        return len(expired)

    def _add(self, session: Session) -> Session:
        self._sessions[session.id] = session
        self._owned[session.owner] += 1
        metrics.sessions_created.inc()
        metrics.sessions_active.set(len(self._sessions))
        return session

    def _remove(self, session: Session, counter: Any) -> None:
        del self._sessions[session.id]
        self._owned[session.owner] -= 1
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


class SharedStore(Protocol):
    """A session store outside this process, shared by every replica (server.redis_store: Redis).

    The engine keeps the embedded SessionStore above for the default, in-memory case and calls
    it synchronously, so a step on an in-memory session costs no await and no copy; a shared store
    is asynchronous (every call may cross the network) and is only used when configured.

    The Sessions it returns are this replica's copies: ``commit`` writes a step only if the store
    still holds ``read_position`` (compare-and-set), ``load`` refreshes a copy."""

    ttl_s: float

    async def create(self, model: Model, top_k: int, owner: str) -> Session: ...
    async def get(self, session_id: str, owner: str) -> Session: ...
    async def fork(self, source: Session) -> Session: ...
    async def delete(self, session_id: str, owner: str) -> None: ...
    async def load(self, session: Session) -> None: ...
    async def commit(self, session: Session, read_position: int, with_request: bool) -> bool: ...
    async def close(self) -> None: ...
    def describe(self) -> str: ...
