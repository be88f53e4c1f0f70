"""Session ids that say which run of the server issued them, and to whom, so that after a restart
the server can tell a session it lost ("restart") from an id it never issued.

An id is still 32 lowercase hex characters (128 bits)::

    random 18 hex (72 bits)   from ``secrets``: what makes an id unguessable (and its first
                              characters, which log lines show, tell sessions apart)
    run     6 hex (24 bits)   random per server process: the run that issued it
    mac     8 hex (32 bits)   HMAC-SHA256 of (random, run, owner), keyed by the id secret, cut short

An id whose MAC verifies for the caller was issued to that caller's API key by a server holding the
secret. The secret lasts across restarts when it can: derived from each session key
(``--session-keys``: the first issues, every one verifies, so keys rotate; every replica given the
same keys shares it), else kept in ``session-ids.key`` in ``--snapshot-dir`` (32 random bytes,
created with mode 0600 at the first start), else random per process: then an id of an earlier run
cannot be told from an unknown one, and its NOT_FOUND is the plain one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from lstmd.server.security import load_session_keys
from lstmd.server.settings import Settings

log = logging.getLogger(__name__)
RUN_HEX, RANDOM_HEX, MAC_HEX = 6, 18, 8
SECRET_FILE = "session-ids.key"
SECRET_BYTES = 32
_DERIVE = b"lstmd session ids v1"  # the id secret of a session key is HMAC(key, this): never the key itself


class SessionIds:
    """Issues ids for this run and checks where one came from."""

    def __init__(self, keys: list[bytes], lasting: bool):
        if not keys:
            raise ValueError("SessionIds needs at least one secret")
        self._keys = keys  # the first issues, every one verifies
        self.lasting = lasting  # the secret outlives this process: an earlier run's ids can be recognised
        self.run = secrets.token_hex(RUN_HEX // 2)
        self.started = time.time()

    @classmethod
    def per_process(cls) -> SessionIds:
        return cls([secrets.token_bytes(SECRET_BYTES)], lasting=False)

    def new(self, owner: str) -> str:
        head = secrets.token_hex(RANDOM_HEX // 2) + self.run
        return head + _mac(self._keys[0], head, owner)

    def issued(self, session_id: str, owner: str) -> bool:
        """Whether ``session_id`` (well-formed) was issued to ``owner`` by a server holding this secret."""
        head, mac = session_id[: RANDOM_HEX + RUN_HEX], session_id[RANDOM_HEX + RUN_HEX :]
        return any(hmac.compare_digest(_mac(key, head, owner), mac) for key in self._keys)

    def from_earlier_run(self, session_id: str, owner: str) -> bool:
        """Whether an earlier run of this server issued ``session_id`` to ``owner``."""
        run = session_id[RANDOM_HEX : RANDOM_HEX + RUN_HEX]
        return self.lasting and run != self.run and self.issued(session_id, owner)


def _mac(key: bytes, head: str, owner: str) -> str:
    return hmac.new(key, f"{head}:{owner}".encode(), hashlib.sha256).hexdigest()[:MAC_HEX]


def load_ids(settings: Settings) -> SessionIds:
    """The ids of this server, with the most lasting secret the settings allow (see the module)."""
    keys = load_session_keys(settings)
    if keys:
        return SessionIds([hmac.new(k, _DERIVE, hashlib.sha256).digest() for k in keys], lasting=True)
    if settings.snapshot_dir:
        try:
            return SessionIds([_secret_file(Path(settings.snapshot_dir) / SECRET_FILE)], lasting=True)
        except (OSError, ValueError) as e:
            log.error("cannot keep the session id secret in %s: %s; a session lost at a restart will be answered "
                      "the plain NOT_FOUND, without the reason", settings.snapshot_dir, e)  # fmt: skip
    return SessionIds.per_process()


def _secret_file(path: Path) -> bytes:
    """The secret in ``path``, created (mode 0600) with a random one when there is none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"{path.name} holds {len(secret)} bytes, not {SECRET_BYTES}: remove it") from None
        return secret
    secret = secrets.token_bytes(SECRET_BYTES)
    with open(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret
