"""Sessions: each one text's LSTM state on the server, and the interface of the store that holds them.

Two stores implement ``SessionStore``: ``MemorySessionStore`` (server.memory_store, the default:
this process, bounded, with idle expiry) and ``RedisSessionStore`` (server.redis_store: shared
by every replica). The engine calls whichever it was given, the same way.
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lstmd.server.errors import AlreadyExists, InvalidInput, NotFound, SessionEnded, echo, rfc3339
from lstmd.server.registry import NO_TOKEN, Model
from lstmd.server.session_ids import SessionIds

_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(eq=False, slots=True)  # slots: 100k idle sessions must fit in 1 GiB
class Session:
    """One text's state. Besides (h, c) after the last token it keeps the state before that token,
    so the distribution of the next word can be recomputed (for Generate without a prompt and for
    the log-probability of a feed's first token) without storing a vocabulary-sized vector.

    A new session of a model whose tokenizer starts from ``zeros`` has the zero state and no last
    token: ``last_token`` is ``registry.NO_TOKEN`` (-1) until its first feed. It has no distribution of the
    next word yet, so its first fed token has no log-probability and Generate needs a prompt."""

    id: str
    model: Model
    top_k: int
    state: np.ndarray  # (2, layers, hidden): h and c after the last token
    prev_state: np.ndarray  # (2, layers, hidden): before the last token
    last_token: int  # NO_TOKEN (-1): none yet, a zero-start session before its first feed
    position: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    last_request: tuple[Any, Any] | None = None  # server.exactly_once: (request key, its answer)
    users: int = 0  # open streams and calls using it: never expired or evicted while > 0
    owner: str = ""  # id of the API key that created it ("" when keys are off)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # feeds apply one at a time, in order

    @classmethod
    def new(cls, session_id: str, model: Model, top_k: int, owner: str) -> Session:
        """A fresh session of ``model`` (its id from server.session_ids)."""
        state, prev_state, last_token = model.initial_state()
        return cls(session_id, model, top_k, state, prev_state, last_token, owner=owner)

    def fork(self, session_id: str) -> Session:
        """A copy with a new id, owned by the same key."""
        return Session(session_id, self.model, self.top_k, self.state.copy(), self.prev_state.copy(),
                       self.last_token, self.position, owner=self.owner)  # fmt: skip

    def copy(self) -> Session:
        """A private copy with the same id, to step without changing this one (a generation's work,
        stored with ``take`` only when it succeeds). The arrays are shared: a step replaces them,
        never writes into them."""
        return Session(self.id, self.model, self.top_k, self.state, self.prev_state, self.last_token, self.position,
                       owner=self.owner)  # fmt: skip

    def take(self, work: Session) -> None:
        """Take the state and position of ``work``, a ``copy`` of this session that was stepped."""
        self.state, self.prev_state, self.last_token, self.position = (
            work.state, work.prev_state, work.last_token, work.position
        )  # fmt: skip

    def busy(self) -> bool:
        return self.users > 0 or self.lock.locked()

    def past_lifetime(self, lifetime_s: float, now: float) -> bool:
        """Whether the maximum session lifetime (0: none) has passed since it was created."""
        return lifetime_s > 0 and now >= self.created + lifetime_s


def unfit(model: Model, shape: tuple[int, ...], last_token: int, position: int) -> str | None:
    """Why a session's stored state (of ``shape``, after ``last_token`` at ``position``) cannot go on
    on ``model`` (a snapshot's, an imported blob's), or None when it can."""
    if shape != (2, model.layers, model.hidden):
        return f"state shape {shape}, the served model's is {(2, model.layers, model.hidden)}"
    if position < 0:
        return f"position {position}"
    if last_token == NO_TOKEN:  # nothing fed yet to a model that starts from zeros
        if model.tokenizer.initial_id is not None or position != 0:
            return (
                f"no last token at position {position}: only a new session of a model that starts from zeros has none"
            )
    elif not 0 <= last_token < model.vocab_size:
        return f"last token {last_token}, outside the served vocabulary"
    return None


def check_id(session_id: str) -> None:
    if not _ID.fullmatch(session_id):
        raise InvalidInput(f"malformed session id {echo(session_id)}: expected 32 lowercase hex characters")


def id_taken(session_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"session {session_id} already exists here (imported before?): import without keep_id for a new id, or "
        "delete that session first"
    )


def not_found(session_id: str, ttl_s: float) -> NotFound:
    """The plain NOT_FOUND: the same for an id never issued, one forgotten, and another key's session."""
    return NotFound(
        f"session {session_id} not found: it was deleted, expired after {ttl_s:g} s idle, or was evicted; "
        "create a new one"
    )


def session_ended(session_id: str, reason: str, when: float, ttl_s: float, lifetime_s: float) -> SessionEnded:
    """The NOT_FOUND of a caller's own session that ended: why, when, and what to do."""
    what = {
        "deleted": "was deleted (DeleteSession, or the end of the stream or generation it was made for)",
        "expired": f"expired after {ttl_s:g} s idle",
        "evicted": "was evicted to make room for a new one (the server was at its session limit, and it was the "
        "least recently used idle session)",
        "lifetime": f"reached the server's maximum session lifetime of {lifetime_s:g} s",
        "restart": "was lost when the server restarted (it was not in a snapshot the server came back from)",
        "unloaded": "ended when its model version was unloaded after its drain (LSTMD_VERSION_DRAIN_S)",
        "exported": "was ended by ExportSession (its blob holds it now)",
    }[reason]
    remedy = {
        "exported": "import its blob (ImportSession) to continue it",
        "unloaded": "create a new one: it goes to the version served now",
    }.get(reason, "create a new one")
    return SessionEnded(f"session {session_id} {what} at {rfc3339(when)}; {remedy}", reason, when)


class SessionStore(ABC):
    """Where sessions live. The Sessions a store hands out are what the engine steps: it computes a
    step on one, then ``commit``s it, which writes it only if the store still holds the position the
    step was computed from (compare-and-set); ``load`` refreshes one. In memory the Session is the
    stored session itself, so ``commit`` only checks that it is still held and ``load`` refreshes
    nothing; a store outside the process (Redis) hands out copies and may lose a compare-and-set to
    another replica.

    A caller sees only the sessions its ``owner`` (API key id, "" when keys are off) created: to
    anyone else a session does not exist. Its own session that ended is a SessionEnded (why and when)
    while the store remembers the ending; anything else the plain ``not_found``. Ids come from
    server.session_ids, so a store can tell an id lost at a restart from one it never issued.

    ``lifetime_s`` (0: none): a session ends that long after it was created. Every call that finds
    one past it (``get``, ``load``, ``position``, ``commit``) ends it, reason "lifetime"."""

    # The Sessions it hands out are the stored ones and none of its calls suspends (the memory
    # store): the engine may then step many sessions' feeds together (Engine.feed_many).
    in_process: bool = False
    ids: SessionIds  # where its sessions' ids come from

    @abstractmethod
    async def create(self, model: Model, top_k: int, owner: str) -> Session: ...

    @abstractmethod
    async def get(self, session_id: str, owner: str) -> Session:
        """The session, if ``owner`` owns it; else NotFound, the same as for a missing one."""

    @abstractmethod
    async def fork(self, source: Session) -> Session:
        """A new session with ``source``'s state, owned by the same key."""

    @abstractmethod
    async def insert(self, session: Session) -> None:
        """Add ``session`` as it is, keeping its id and state (an imported one): AlreadyExists when a
        session here holds its id; CapacityExceeded at the session limit or its owner's quota."""

    @abstractmethod
    async def delete(self, session_id: str, owner: str) -> None: ...

    @abstractmethod
    async def end(self, session: Session, reason: str, at_position: int | None = None) -> bool:
        """End ``session`` for ``reason`` (one of server.errors.END_REASONS), recording why and when, so its
        owner's next call on it gets that NOT_FOUND; does nothing when it is gone already. With
        ``at_position``, only if the store holds it at that position: False when it moved (another
        replica fed it), and it is left as it is."""

    @abstractmethod
    async def discard(self, session: Session) -> None:
        """Remove an ephemeral session at the end of its stream; never raises for one already gone."""

    @abstractmethod
    async def load(self, session: Session) -> None:
        """Bring ``session`` up to date with the store; NotFound when it is gone."""

    @abstractmethod
    async def position(self, session: Session) -> int | None:
        """The position the store holds for ``session`` now, or None when it is gone (deleted,
        expired, evicted): a check cheaper than ``load``, for long calls that must notice."""

    @abstractmethod
    async def commit(self, session: Session, read_position: int, with_request: bool) -> bool:
        """Store ``session``'s new step if the store still holds ``read_position``: True when stored;
        False when another writer advanced it first, and ``session`` then holds the stored state.
        ``with_request``: also store its exactly-once record. NotFound when the session is gone."""

    @abstractmethod
    def touch(self, session: Session) -> None:
        """Mark ``session`` as used now, also after a call that stepped nothing (idle expiry,
        least-recently-used eviction)."""

    @abstractmethod
    async def count(self, model: Model) -> int:
        """Sessions of this model version held now (in a shared store: by every replica)."""

    @abstractmethod
    async def end_version(self, model: Model, when: float) -> int:
        """End the sessions of this model version (reason "unloaded": a later lookup of one raises
        ``unloaded``); returns how many are left. In memory those in use are left, and end once free;
        a shared store cannot tell what other replicas use, so it ends them all and returns 0."""

    async def versions_held(self) -> set[tuple[str, str]]:
        """(model name, version) of every version a live session in the store is on. In memory every
        session is on a loaded version, so none needs asking for; a shared store (Redis) says."""
        return set()

    async def announce(self, serving: list[Model], stopped: list[Model], for_s: float) -> None:
        """Record, for the next ``for_s`` seconds, that this replica serves the versions ``serving``,
        and that it no longer serves ``stopped``. Alone (in memory) there is nobody to tell; a shared
        store (Redis) records it for the other replicas."""
        return None

    async def publish_reload(self, pins: dict[str, str]) -> int:
        """Tell the other replicas that an admin reloaded, with these pins: returns the reload's number
        (in memory there are no others: 0)."""
        return 0

    async def last_reload(self) -> tuple[int, dict[str, str], bool]:
        """The number and the pins of the newest reload ``publish_reload`` told of, and whether this
        replica made it ((0, {}, False): none)."""
        return 0, {}, False

    async def others_serving(self, model: Model) -> list[str]:
        """The other live replicas that serve this version (their ids): in memory none."""
        return []

    @abstractmethod
    async def start(self) -> None:
        """Start background work, once the event loop runs."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and connections."""

    @abstractmethod
    def describe(self) -> str:
        """Where the sessions are, for the log."""
