"""Session recovery, shared by the blocking and the asyncio client: the bounded tail of what a
session was fed, the decision what to do when the server lost the session or holds it at an
older position, and the retry policy for a server that is restarting.

The tail holds token ids (as the server applied them: text comes back tokenized in every
``Prediction``), in the feeds they were sent in, so a re-feed makes the same model calls as the
original feeds. A recovery is *exact* when the tail covers everything the server is missing: the
server's state is then what it would have been without the failure. Otherwise it is
*approximate*: a recreated session starts from a new session's state plus the tail, a session
at an older position continues from that position plus the tail. A session whose model version
the server unloaded at the end of its drain (NOT_FOUND, reason "unloaded") is recreated on the
version served now and its tail re-fed, always approximate (other weights), but only when both
versions share their vocabulary (``vocabulary_sha256``). Otherwise a session is never recreated on
another version of its model (the tail's token ids could mean other words there): the NOT_FOUND
goes to the caller.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from dataclasses import dataclass

from lstmd.client._errors import DeadlineExceeded, LstmdError, NotFound, PositionMismatch, Unavailable

log = logging.getLogger("lstmd.client")
DEFAULT_TAIL = 4096  # tokens kept per session: 16 KB each
DEFAULT_WAIT_FOR_RESTART_S = 30.0
# Sessions ended on purpose are not recreated: deleted (by this key, through any handle), moved into a
# blob (ExportSession with end_session: the blob holds it, elsewhere), past the operator's lifetime limit.
NOT_RECOVERED = frozenset({"deleted", "exported", "lifetime"})
MAX_RECOVERIES = 3  # per call: a server that keeps losing the session is an error, not a loop


@dataclass(frozen=True)
class Recovery:
    """One recovery of a session (``Session.recoveries``).

    ``reason`` is ``"not_found"`` (the server had lost the session: restarted without it, expired or
    evicted it; a new session was created, ``new_id``), ``"unloaded"`` (its model version was
    unloaded after its drain: a new session on the version served now, never exact), or
    ``"behind"`` (the server held it at an older position, ``server_position``, after restoring an
    older snapshot: it was caught up).
    ``refed`` tokens were sent again; ``position`` is the session's position afterwards. ``exact``
    says the tail covered everything the server had lost. ``ended`` is why the server said the session
    ended, for a ``"not_found"`` from a server that said (``NotFound.reason``: "expired", "evicted",
    "restart", ...), else None."""

    reason: str
    old_id: str
    new_id: str
    server_position: int
    position: int
    refed: int
    exact: bool
    ended: str | None = None


@dataclass(frozen=True)
class Plan:
    """What to send to recover: ``chunks`` (token ids, one feed each) onto a new session
    (``recreate``) or onto the existing one at ``start``."""

    reason: str
    recreate: bool
    start: int
    chunks: list[list[int]]
    exact: bool
    ended: str | None = None  # the server's reason for a NotFound


class Tail:
    """The last ``limit`` tokens fed to a session, in their feeds; they end at position ``end``."""

    def __init__(self, limit: int, position: int):
        self.limit = limit
        self.end = position
        self._chunks: deque[array[int]] = deque()
        self._tokens = 0

    @property
    def start(self) -> int:
        """Position of the first token held; 0 when the tail holds the session's whole history."""
        return self.end - self._tokens

    def copy(self) -> Tail:
        twin = Tail(self.limit, self.end)
        twin._chunks, twin._tokens = deque(array("i", c) for c in self._chunks), self._tokens
        return twin

    def add(self, ids: list[int], position: int) -> None:
        """``ids`` were applied and the session is now at ``position``."""
        if position - len(ids) != self.end:  # fed by someone else meanwhile: the history is unknown
            self.reset(position)
            return
        self.end = position
        if self.limit <= 0:
            return
        self._chunks.append(array("i", ids))
        self._tokens += len(ids)
        while self._tokens > self.limit:
            excess = self._tokens - self.limit
            if len(self._chunks[0]) <= excess:
                self._tokens -= len(self._chunks.popleft())
            else:
                del self._chunks[0][:excess]
                self._tokens -= excess

    def reset(self, position: int) -> None:
        """Forget the history: the session is at ``position`` for reasons the tail does not know."""
        self._chunks.clear()
        self._tokens = 0
        self.end = position

    def since(self, position: int) -> list[list[int]]:
        """The feeds from ``position`` (at least ``start``) to the end."""
        chunks, at = [], self.start
        for chunk in self._chunks:
            if at + len(chunk) > position:
                chunks.append(chunk[max(0, position - at) :].tolist())
            at += len(chunk)
        return chunks

    def plan(self, error: LstmdError, position: int) -> Plan | None:
        """How to recover a session the client holds at ``position`` from ``error``; None when it cannot."""
        if self.limit <= 0 or self.end != position:
            return None
        if isinstance(error, NotFound) and error.reason in NOT_RECOVERED:
            return None
        if isinstance(error, NotFound) and error.reason == "unloaded":  # another version's weights: approximate
            return Plan("unloaded", True, 0, self.since(self.start), False, error.reason)
        if isinstance(error, NotFound):
            return Plan("not_found", True, 0, self.since(self.start), self.start == 0, error.reason)
        if isinstance(error, PositionMismatch) and error.actual_position is not None:
            behind = error.actual_position
            if behind >= position:  # ahead: fed by someone else; not ours to undo
                return None
            if behind >= self.start:
                return Plan("behind", False, behind, self.since(behind), True)
            return Plan("behind", False, behind, self.since(self.start), False)
        return None


def report(recovery: Recovery) -> None:
    """The log line of a recovery: WARNING when it was approximate."""
    what = {
        "not_found": f"was lost by the server ({recovery.ended or 'reason not given'}); recreated as {recovery.new_id}",
        "unloaded": f"ended with its model version's unload; recreated on the version served now as {recovery.new_id}",
    }.get(recovery.reason, f"was at position {recovery.server_position} on the server; caught up")
    how = (
        "exactly"
        if recovery.exact
        else "approximately (another model version)"
        if recovery.reason == "unloaded"
        else "approximately (its history was longer than the recovery tail)"
    )
    log.log(logging.INFO if recovery.exact else logging.WARNING, "session %s %s by re-feeding %d tokens, %s; now at "
            "position %d", recovery.old_id, what, recovery.refed, how, recovery.position)  # fmt: skip


class Backoff:
    """When to try a call again: up to ``retries`` times on UNAVAILABLE, DEADLINE_EXCEEDED and a
    server-side CANCELLED (a call that reached a server just as it stopped), and on UNAVAILABLE also
    for as long as ``wait_s`` seconds since the first one (a server restarting); exponential
    back-off from 50 ms, at most 1 s apart. ``retries=0`` turns all of it off."""

    def __init__(self, retries: int, wait_s: float):
        self.retries, self.wait_s = retries, wait_s
        self.attempt = 0
        self.first_unavailable: float | None = None

    def delay(self, error: LstmdError) -> float | None:
        """Seconds to wait before the next attempt, or None: give up and raise ``error``."""
        if self.retries <= 0 or (not isinstance(error, Unavailable | DeadlineExceeded) and error.code != "CANCELLED"):
            return None
        self.attempt += 1
        delay = min(0.05 * 2.0 ** (self.attempt - 1), 1.0)
        if isinstance(error, Unavailable):
            now = time.monotonic()
            if self.first_unavailable is None:
                self.first_unavailable = now
            left = self.first_unavailable + self.wait_s - now
            if left > 0:
                return min(delay, left)
        return delay if self.attempt <= self.retries else None
