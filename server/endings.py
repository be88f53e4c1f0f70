"""Why sessions ended: a bounded record of the sessions that ended in this process, so a NOT_FOUND
for one of the caller's own can say why and when (server.sessions.session_ended words it).

Each record is an ``Ending``; at most ``ended_sessions_kept`` are held, the oldest forgotten first.
Measured with tracemalloc (tests/test_session_end.py prints it): about 250 bytes a record with its
32-character id, so the default 100,000 records hold about 25 MB. Snapshots keep them across a
graceful restart (server.snapshot_format, version 2).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple


class Ending(NamedTuple):
    id: str
    reason: str  # one of server.errors.END_REASONS
    when: float  # Unix seconds
    owner: str  # the API key id that owned the session: only its caller hears the reason


class Endings:
    """The latest ``kept`` endings, oldest first."""

    def __init__(self, kept: int):
        self.kept = kept
        self._held: OrderedDict[str, Ending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def add(self, ending: Ending) -> None:
        if self.kept <= 0:
            return
        self._held[ending.id] = ending
        self._held.move_to_end(ending.id)
        while len(self._held) > self.kept:
            self._held.popitem(last=False)

    def get(self, session_id: str) -> Ending | None:
        return self._held.get(session_id)

    def all(self) -> list[Ending]:
        """Every record, oldest first (the order ``add`` restores them in)."""
        return list(self._held.values())
