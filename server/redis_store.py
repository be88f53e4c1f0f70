"""Sessions in Redis, shared by every replica (``--session-store redis://host:port/db``).

Any replica can serve any session: everything a session is lives in one Redis hash,
``lstmd:session:<id>``, with its idle time-to-live set in Redis (``session_ttl_s``, renewed on
every step)::

    pos    position, in decimal: the compare-and-set below compares it
    model  model name         ver    model version        owner  API key id ("" when keys are off)
    hdr    struct <BiIdd: format (1), last token, top_k, created, last used (Unix seconds)
    st     raw float32, (2, 2, layers, hidden): the state after the last token, then the one before it
    req    the exactly-once record of the last feed with expected_position, as JSON (absent: none)

No pickle: a replica reads nothing but numbers, strings and JSON.

The session limits hold across replicas: ``lstmd:index`` (every session) and ``lstmd:index:<owner>``
(an API key's sessions) are sorted sets of session ids scored by when each expires (Unix ms),
renewed with its TTL, and so is ``lstmd:version:<model>/<version>`` (a model version's sessions:
ListModels' counts, and the ones to end when that version unloads). A session is created by a Lua
script that first drops the expired ids, then refuses when the index holds ``max_sessions`` (or
the key's index ``max_sessions_per_key``), and otherwise writes the hash and the index entries,
so concurrent creates on any number of replicas can never overshoot. At the limit the shared store
refuses new sessions whatever ``--at-capacity`` says: it cannot tell which sessions other replicas
are streaming, so it evicts none. ``lstmd_sessions_active`` is the index's size, refreshed on every
create and delete and every ``sweep_interval_s``, so every replica reports the shared count. A
version unloaded at its drain deadline ends its sessions on every replica at once (one script;
reason "unloaded"), but only once no other replica serves it: ``lstmd:serving:<model>/<version>``
is a sorted set of the ids of the replicas serving that version, scored by when each announcement
expires (Unix ms); every replica renews its own each second (server.versions) and removes it when
it stops serving the version, or stops. ``lstmd:reload`` (gen, pins, by) is the newest ReloadModels
made on any replica: a counter each one raises with its pins, and every replica follows a number
other than the one it last saw (server.versions).

A step is written by one Lua script that compares ``pos`` with the position the step was computed
from and writes the new state only if they are equal, so two replicas can never both apply a step
to one session: the loser's result is discarded, it re-reads the session and retries (or, for a
feed with ``expected_position``, answers FAILED_PRECONDITION or replays the winner's answer:
see Engine.feed). Reads and writes issued in one turn of the event loop (the sessions of
one batch) go to Redis together, in one pipelined round trip.

Why a session ended (server.endings has the memory store's record) is a hash ``lstmd:ended:<id>``
(reason, when in Unix seconds, owner) with a time-to-live of ``ENDED_TTL_S`` or the session TTL,
whichever is longer: long enough that a client coming back to a session it left idle up to the TTL
hears the true reason, and bounded in time (Redis holds a record per session ended in that window,
about 220 bytes each) rather than in number. DeleteSession and ``end`` write it in the script that
deletes the hash. A session whose hash Redis itself expired leaves no record; the scripts that drop
expired ids from the index write one for each (reason "expired", when its index score says),
without an owner, so it is shown only to a caller for whom the id's MAC verifies
(server.session_ids). An id the caller was issued, with neither hash nor record but still in the
index past its expiry, is "expired" too: the shared store never evicts, every other ending writes
its record, and a replica restarting loses nothing in Redis, so idle expiry is the only way left.

The Session objects this store hands out are the replica's cache of a session it is streaming:
a stream keeps its Session, so a step needs only the write; the write's compare-and-set catches
a stale cache, which is then re-read. Correctness never depends on the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from lstmd.server import metrics
from lstmd.server.errors import CapacityExceeded, NotFound, StoreUnavailable, Unavailable
from lstmd.server.exactly_once import record_from_json, record_to_json
from lstmd.server.registry import Model, ModelRegistry
from lstmd.server.session_ids import SessionIds
from lstmd.server.sessions import Session, SessionStore, check_id, id_taken, not_found, session_ended

log = logging.getLogger(__name__)
PREFIX = "lstmd:session:"
ENDED = "lstmd:ended:"  # why a session ended: reason, when, owner (absent: one Redis expired)
ENDED_TTL_S = 86_400.0
FORMAT = 1
_HEADER = struct.Struct("<BiIdd")  # format, last token (signed: -1 is NO_TOKEN), top_k, created, last used

INDEX = "lstmd:index"  # every session id, scored by when it expires (Unix ms); INDEX:<owner> per API key
VERSION = "lstmd:version:"  # + "<model>/<version>": that version's session ids, scored likewise
SERVING = "lstmd:serving:"  # + "<model>/<version>": ids of the replicas serving it, scored by expiry (Unix ms)
RELOAD = "lstmd:reload"  # the newest ReloadModels on any replica: its number ("gen"), its pins (JSON), by whom
# The scripts name the owner's index themselves (INDEX .. ':' .. owner): lstmd's Redis is one instance,
# not a cluster, so keys computed in a script are fine.

# KEYS[1] the session, KEYS[2] INDEX; ARGV: position read, new position, hdr, st, req ("" keeps it),
# TTL in ms, expiry (Unix ms). Returns -2 when written, -1 when the session is gone, else the position
# another replica left.
_CAS = """
local pos = redis.call('HGET', KEYS[1], 'pos')
if not pos then return -1 end
if pos ~= ARGV[1] then return tonumber(pos) end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'pos', ARGV[2], 'hdr', ARGV[3], 'st', ARGV[4], 'req', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'pos', ARGV[2], 'hdr', ARGV[3], 'st', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local id = string.sub(KEYS[1], #KEYS[1] - 31)
redis.call('ZADD', KEYS[2], 'XX', ARGV[7], id)
local owner, model, ver = unpack(redis.call('HMGET', KEYS[1], 'owner', 'model', 'ver'))
if owner ~= '' then redis.call('ZADD', KEYS[2] .. ':' .. owner, 'XX', ARGV[7], id) end
redis.call('ZADD', 'lstmd:version:' .. model .. '/' .. ver, ARGV[7], id)  -- not XX: a live session is always in it
return -2
"""
# Drops the ids whose expiry (score) is before ``now`` from INDEX, leaving an "expired" record for each
# that has none (a deleted one has, and left the index then). Put before _CREATE and _COUNT.
_PRUNE = """
local function prune(index, now, ended_ttl)
  local gone = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'WITHSCORES')
  for i = 1, #gone, 2 do
    local ended = 'lstmd:ended:' .. gone[i]
    if redis.call('EXISTS', ended) == 0 then
      redis.call('HSET', ended, 'reason', 'expired', 'when', tostring(tonumber(gone[i + 1]) / 1000))
      redis.call('PEXPIRE', ended, ended_ttl)
    end
  end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
end
"""
# KEYS[1] the session, KEYS[2] INDEX, KEYS[3] its version's index; ARGV: now (Unix ms), expiry (Unix ms),
# TTL in ms, max sessions, max per owner (0: none), the session id, owner, the records' TTL in ms, then
# the hash's fields and values. Returns the number of sessions after it, -3 when the owner holds its
# maximum, -4 when the store holds its maximum, -5 when the id is taken (an imported session keeping it).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -5 end
local owned = KEYS[2] .. ':' .. ARGV[7]
prune(KEYS[2], ARGV[1], ARGV[8])
if ARGV[7] ~= '' then
  redis.call('ZREMRANGEBYSCORE', owned, '-inf', ARGV[1])
  if tonumber(ARGV[5]) > 0 and redis.call('ZCARD', owned) >= tonumber(ARGV[5]) then return -3 end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return -4 end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('DEL', 'lstmd:ended:' .. ARGV[6])  -- an id imported again: its old ending is over
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', owned, ARGV[2], ARGV[6]) end
return redis.call('ZCARD', KEYS[2])
"""
# KEYS[1] the session, KEYS[2] INDEX, KEYS[3] its ended record; ARGV: the caller's owner id, the session
# id, the reason, when (Unix seconds), the record's TTL in ms, the position it must be at ("": any).
# Deletes it only for its owner, recording why. Returns the number of sessions left, -1 when it was not
# the owner's (or gone), -6 when it was at another position.
_DELETE = """
local owner, model, ver, pos = unpack(redis.call('HMGET', KEYS[1], 'owner', 'model', 'ver', 'pos'))
if owner ~= ARGV[1] then return -1 end
if ARGV[6] ~= '' and pos ~= ARGV[6] then return -6 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', 'lstmd:version:' .. model .. '/' .. ver, ARGV[2])
redis.call('HSET', KEYS[3], 'reason', ARGV[3], 'when', ARGV[4], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[2])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2] .. ':' .. ARGV[1], ARGV[2]) end
return redis.call('ZCARD', KEYS[2])
"""
# KEYS[1] INDEX (or a version's index); ARGV[1] now (Unix ms), ARGV[2] the records' TTL in ms. The number
# of sessions that have not expired.
_COUNT = """
prune(KEYS[1], ARGV[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""
# KEYS[1] a version's index, KEYS[2] INDEX; ARGV[1] when (Unix seconds), ARGV[2] the records' TTL in ms.
# Ends every session of the version, recording why ("unloaded"). Returns how many.
_END_VERSION = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local ended = 0
for _, id in ipairs(ids) do
  local key = 'lstmd:session:' .. id
  local owner = redis.call('HGET', key, 'owner')
  local ended_key = 'lstmd:ended:' .. id
  if owner then
    redis.call('DEL', key)
    if owner ~= '' then redis.call('ZREM', KEYS[2] .. ':' .. owner, id) end
    redis.call('HSET', ended_key, 'reason', 'unloaded', 'when', ARGV[1], 'owner', owner)
    redis.call('PEXPIRE', ended_key, ARGV[2])
    ended = ended + 1
  elseif redis.call('EXISTS', ended_key) == 0 then  -- Redis expired it: recorded as the prune would
    local expiry = redis.call('ZSCORE', KEYS[2], id)
    if expiry then
      redis.call('HSET', ended_key, 'reason', 'expired', 'when', tostring(tonumber(expiry) / 1000))
      redis.call('PEXPIRE', ended_key, ARGV[2])
    end
  end
  redis.call('ZREM', KEYS[2], id)
end
redis.call('DEL', KEYS[1])
return ended
"""
# KEYS[1] a version's serving set; ARGV: this replica's id, now, expiry (Unix ms), the set's TTL in ms.
# Renews this replica's announcement, dropping the expired ones (replicas gone); the set expires
# when no replica renews it.
_ANNOUNCE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
"""
# KEYS[1] RELOAD; ARGV: the pins as JSON, this replica's id. Returns the reload's number.
_PUBLISH_RELOAD = """
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'pins', ARGV[1], 'by', ARGV[2])
return gen
"""
_WRITTEN, _GONE = -2, -1
_OWNER_FULL, _STORE_FULL, _TAKEN, _MOVED = -3, -4, -5, -6


class RedisSessionStore(SessionStore):
    """The shared store. Calls raise StoreUnavailable while Redis cannot be reached; the client
    reconnects by itself, so the server serves again as soon as Redis is back."""

    def __init__(
        self, url: str, registry: ModelRegistry, ttl_s: float, max_sessions: int = 100_000, max_per_owner: int = 0,
        count_interval_s: float = 10.0, timeout_s: float = 2.0, lifetime_s: float = 0.0, ids: SessionIds | None = None,
    ):  # fmt: skip
        self.url = url
        self._registry = registry
        self.ttl_s, self.lifetime_s = ttl_s, lifetime_s
        self.ids = ids or SessionIds.per_process()
        # which replica announces a version: readable in the log, unique even for stores in one process (tests)
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._ttl_ms = str(int(ttl_s * 1000))
        self._ended_ttl_ms = str(int(max(ttl_s, ENDED_TTL_S) * 1000))
        self.max_sessions, self.max_per_owner, self._count_interval_s = max_sessions, max_per_owner, count_interval_s
        # One immediate retry on a fresh connection (pooled ones die when Redis restarts); no backoff,
        # so an unreachable Redis answers UNAVAILABLE within ``timeout_s``, not after a minute.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1)
        )
        self._cas = self._redis.register_script(_CAS)
        self._create = self._redis.register_script(_PRUNE + _CREATE)
        self._delete = self._redis.register_script(_DELETE)
        self._count = self._redis.register_script(_PRUNE + _COUNT)
        self._end_version = self._redis.register_script(_END_VERSION)
        self._announce = self._redis.register_script(_ANNOUNCE)
        self._publish_reload = self._redis.register_script(_PUBLISH_RELOAD)
        self._counter: asyncio.Task[None] | None = None
        self._pending: list[tuple[str, Callable[[Any], None], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()  # referenced until done
        self._closed = False

    async def start(self) -> None:
        self._counter = asyncio.get_running_loop().create_task(self._count_forever())  # connections open on first use

    async def close(self) -> None:
        """Finish the round trips already queued, refuse any later, then close the connections: a
        round trip after the pool closed would open a connection nothing closes."""
        self._closed = True
        if self._counter:
            self._counter.cancel()
            await asyncio.gather(self._counter, return_exceptions=True)
        await asyncio.gather(*self._flushes, return_exceptions=True)
        await self._redis.aclose()

    async def _count_forever(self) -> None:
        """Keep ``lstmd_sessions_active`` at the shared count (sessions other replicas created, or that expired)."""
        while True:
            try:
                count = await self._submit("count", self._queue_count)
                metrics.sessions_active.set(count)
            except StoreUnavailable:
                pass  # counted in lstmd_store_errors_total; the next round tries again
            await asyncio.sleep(self._count_interval_s)

    def _queue_count(self, pipe: Any) -> None:
        _script(pipe, self._count, INDEX, (_now_ms(), self._ended_ttl_ms))

    def touch(self, session: Session) -> None:
        pass  # every commit renews the session's time-to-live in Redis

    def describe(self) -> str:
        """The URL without a password, for the log."""
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    # the batch of one event-loop turn: one pipelined round trip

    def _submit(self, op: str, add: Callable[[Any], None]) -> asyncio.Future[Any]:
        """Queue one command (``add`` puts it on a pipeline); all queued in this turn of the event loop
        are sent together by one task that starts on the next turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            stopping = "the server is stopping: its session store is closed; retry on another replica"
            future.set_exception(StoreUnavailable(stopping))
            return future
        self._pending.append((op, add, future))
        if len(self._pending) == 1:
            task = loop.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return future

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        started = time.perf_counter()
        try:
            try:
                results = await self._execute(batch)
            except RedisConnectionError:
                # Pooled connections die when Redis restarts, and loading the scripts on one is not retried
                # by the client: once more, on a fresh connection. Repeating a batch is safe: a repeated
                # compare-and-set finds the position moved and the engine re-reads the session.
                results = await self._execute(batch)
        except (RedisError, OSError) as e:
            metrics.store_errors.inc(len(batch))
            error = self._unreachable(e)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        op = batch[0][0] if all(b[0] == batch[0][0] for b in batch) else "mixed"
        metrics.store_round_trip_seconds.labels(op).observe(time.perf_counter() - started)
        metrics.store_batch_size.labels(op).observe(len(batch))
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _unreachable(self, e: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"the session store ({self.describe()}) is unreachable: {e}; sessions cannot be "
                                "read or written until it is back; retry shortly")  # fmt: skip

    async def _execute(self, batch: list[tuple[str, Callable[[Any], None], asyncio.Future[Any]]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, add, _ in batch:
                add(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results

    # the interface the engine uses

    async def create(self, model: Model, top_k: int, owner: str) -> Session:
        session = Session.new(self.ids.new(owner), model, top_k, owner)
        await self._insert(session)
        return session

    async def fork(self, source: Session) -> Session:
        await self.load(source)  # the newest state, not this replica's copy
        copy = source.fork(self.ids.new(source.owner))
        await self._insert(copy)
        return copy

    async def insert(self, session: Session) -> None:
        await self._insert(session)

    async def get(self, session_id: str, owner: str) -> Session:
        check_id(session_id)
        fields = await self._submit("read", lambda pipe: pipe.hgetall(PREFIX + session_id))
        if not fields or fields.get(b"owner", b"").decode() != owner:
            raise await self._gone(session_id, owner, held=bool(fields))
        session = self._decode(session_id, fields)
        await self._check_lifetime(session)
        return session

    async def _gone(self, session_id: str, owner: str, held: bool = False) -> NotFound:
        """The NOT_FOUND of an id Redis holds no session of ``owner``'s under (``held``: another key's):
        why it ended when that is the caller's own session and known, else the plain one."""
        record, expiry = await asyncio.gather(
            self._submit("read", lambda pipe: pipe.hgetall(ENDED + session_id)),
            self._submit("read", lambda pipe: pipe.zscore(INDEX, session_id)),
        )
        issued = not held and self.ids.issued(session_id, owner)
        if record and (record.get(b"owner", b"").decode() == owner if b"owner" in record else issued):
            when = float(record[b"when"])
            return session_ended(session_id, record[b"reason"].decode(), when, self.ttl_s, self.lifetime_s)
        if not record and issued and expiry is not None and expiry <= _now_ms():  # not yet dropped from the index
            return session_ended(session_id, "expired", expiry / 1000, self.ttl_s, self.lifetime_s)
        return not_found(session_id, self.ttl_s)

    async def _check_lifetime(self, session: Session) -> None:
        """End ``session`` if it is past the maximum lifetime, and raise its NOT_FOUND."""
        if session.past_lifetime(self.lifetime_s, time.time()):
            await self.end(session, "lifetime")
            raise await self._gone(session.id, session.owner)

    async def load(self, session: Session) -> None:
        """Refresh ``session`` (this replica's copy) from Redis."""
        fresh = await self.get(session.id, session.owner)
        session.state, session.prev_state, session.last_token = fresh.state, fresh.prev_state, fresh.last_token
        session.position, session.last_used, session.last_request = fresh.position, fresh.last_used, fresh.last_request

    async def position(self, session: Session) -> int | None:
        if session.past_lifetime(self.lifetime_s, time.time()):
            await self.end(session, "lifetime")
            return None
        stored = await self._submit("read", lambda pipe: pipe.hget(PREFIX + session.id, "pos"))
        return None if stored is None else int(stored)

    async def commit(self, session: Session, read_position: int, with_request: bool) -> bool:
        """Write ``session``'s new state if Redis still holds ``read_position``: True when written,
        False when another replica advanced the session first (``session`` is then re-read). NotFound
        when it is gone; on StoreUnavailable the copy is marked stale, so its next use re-reads it."""
        try:
            if await self._write(session, read_position, with_request):
                return True
        except StoreUnavailable:
            session.position = -1  # unknown whether it was written: the next use re-reads it
            raise
        await self.load(session)
        return False

    async def _write(self, session: Session, read_position: int, with_request: bool) -> bool:
        await self._check_lifetime(session)
        session.last_used = time.time()
        header = _HEADER.pack(FORMAT, session.last_token, session.top_k, session.created, session.last_used)
        state = np.stack((session.state, session.prev_state)).tobytes()  # (2, 2, layers, hidden) float32
        request = json.dumps(record_to_json(session.last_request)) if with_request else ""
        args = (str(read_position), str(session.position), header, state, request, self._ttl_ms, self._expiry_ms())
        outcome = await self._submit("write", lambda pipe: _script(pipe, self._cas, (PREFIX + session.id, INDEX), args))
        if outcome == _GONE:
            raise await self._gone(session.id, session.owner)
        if outcome != _WRITTEN:
            metrics.store_conflicts.inc()
            return False
        return True

    async def delete(self, session_id: str, owner: str) -> None:
        check_id(session_id)
        if await self._end(session_id, owner, "deleted") != "ended":
            raise await self._gone(session_id, owner)

    async def end(self, session: Session, reason: str, at_position: int | None = None) -> bool:
        return await self._end(session.id, session.owner, reason, at_position) != "moved"

    async def _end(self, session_id: str, owner: str, reason: str, at_position: int | None = None) -> str:
        """Delete the session if ``owner``'s (and at ``at_position``, when given), writing why: "ended",
        "gone" when it was not there, "moved" when it was at another position."""
        keys = (PREFIX + session_id, INDEX, ENDED + session_id)
        args = (owner, session_id, reason, repr(time.time()), self._ended_ttl_ms,
                "" if at_position is None else str(at_position))  # fmt: skip
        left = await self._submit("delete", lambda pipe: _script(pipe, self._delete, keys, args))
        if left == _MOVED:
            return "moved"
        if left < 0:
            return "gone"
        metrics.count_ending(reason)
        metrics.sessions_active.set(left)
        return "ended"

    async def count(self, model: Model) -> int:
        keys, args = _version_key(model), (_now_ms(), self._ended_ttl_ms)
        count: int = await self._submit("count", lambda pipe: _script(pipe, self._count, keys, args))
        return count

    async def versions_held(self) -> set[tuple[str, str]]:
        """From the version indexes: each one holding an id not yet expired. At start, and each round
        after until Redis answers (server.versions)."""
        try:
            keys = [key async for key in self._redis.scan_iter(match=VERSION + "*", count=1000)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zcount(key, _now_ms(), "+inf")
                counts = await pipe.execute()
        except (RedisError, OSError) as e:
            raise self._unreachable(e) from e
        held = [key.decode()[len(VERSION) :].rpartition("/") for key, n in zip(keys, counts, strict=True) if n]
        return {(name, version) for name, _, version in held}

    async def announce(self, serving: list[Model], stopped: list[Model], for_s: float) -> None:
        """One round trip: renew this replica's entry in each served version's serving set, and remove
        it from the sets of the versions it stopped serving."""
        now, ttl_ms = _now_ms(), int(for_s * 1000)
        args = (self.replica, now, now + ttl_ms, ttl_ms)
        renew = [lambda pipe, key=key: _script(pipe, self._announce, key, args) for key in map(_serving_key, serving)]
        drop = [lambda pipe, key=key: pipe.zrem(key, self.replica) for key in map(_serving_key, stopped)]
        await asyncio.gather(*(self._submit("announce", add) for add in [*renew, *drop]))

    async def publish_reload(self, pins: dict[str, str]) -> int:
        args = (json.dumps(pins, sort_keys=True), self.replica)
        gen: int = await self._submit("write", lambda pipe: _script(pipe, self._publish_reload, RELOAD, args))
        return gen

    async def last_reload(self) -> tuple[int, dict[str, str], bool]:
        gen, pins, by = await self._submit("read", lambda pipe: pipe.hmget(RELOAD, "gen", "pins", "by"))
        return int(gen or 0), json.loads(pins) if pins else {}, by == self.replica.encode()

    async def others_serving(self, model: Model) -> list[str]:
        key, now = _serving_key(model), _now_ms()
        ids = await self._submit("read", lambda pipe: pipe.zrangebyscore(key, now, "+inf"))
        return sorted(replica for replica in (i.decode() for i in ids) if replica != self.replica)

    async def end_version(self, model: Model, when: float) -> int:
        """Ends every session of the version on every replica: this replica cannot tell which ones others
        are using (their next write finds the session gone and answers that it ended). Called only once
        no other replica serves the version (``others_serving``)."""
        keys, args = (_version_key(model), INDEX), (repr(when), self._ended_ttl_ms)
        ended = await self._submit("delete", lambda pipe: _script(pipe, self._end_version, keys, args))
        if ended:
            metrics.sessions_ended.labels("unloaded").inc(ended)
            metrics.sessions_unloaded.inc(ended)
            log.warning("ended %d sessions of %s version %s: it was unloaded after its drain", ended, model.name,
                        model.version)  # fmt: skip
        return 0

    async def discard(self, session: Session) -> None:
        try:
            await self.end(session, "deleted")
        except StoreUnavailable as e:  # its TTL removes it
            log.info("ephemeral session %s… not deleted at stream end: %s", session.id[:8], e)

    # encoding

    async def _insert(self, session: Session) -> None:
        mapping = {
            "pos": str(session.position),
            "model": session.model.name,
            "ver": session.model.version,
            "owner": session.owner,
            "hdr": _HEADER.pack(FORMAT, session.last_token, session.top_k, session.created, session.last_used),
            "st": np.stack((session.state, session.prev_state)).astype(np.float32).tobytes(),
        }
        if session.last_request is not None:  # an imported session's exactly-once record
            mapping["req"] = json.dumps(record_to_json(session.last_request))
        args = (_now_ms(), self._expiry_ms(), self._ttl_ms, self.max_sessions, self.max_per_owner, session.id,
                session.owner, self._ended_ttl_ms, *(item for pair in mapping.items() for item in pair))  # fmt: skip
        keys = (PREFIX + session.id, INDEX, _version_key(session.model))
        count = await self._submit("create", lambda pipe: _script(pipe, self._create, keys, args))
        if count == _TAKEN:
            raise id_taken(session.id)
        if count == _OWNER_FULL:
            raise CapacityExceeded(
                f"API key {session.owner!r} holds its maximum of {self.max_per_owner} sessions on all replicas: "
                "delete sessions it no longer needs (DeleteSession), or ask the operator to raise "
                "--max-sessions-per-key"
            )
        if count == _STORE_FULL:
            raise CapacityExceeded(
                f"the shared session store holds its maximum of {self.max_sessions} sessions (on all replicas): "
                "delete sessions you no longer need, or retry later"
            )
        metrics.sessions_created.inc()
        metrics.sessions_active.set(count)

    def _expiry_ms(self) -> int:
        return _now_ms() + int(self._ttl_ms)

    def _decode(self, session_id: str, fields: dict[bytes, bytes]) -> Session:
        name, version = fields[b"model"].decode(), fields[b"ver"].decode()
        model = self._registry.find(name, version)
        if model is None:  # the session lives: another replica serves it, or this one has yet to be reloaded
            raise Unavailable(
                f"session {session_id} belongs to model {name!r} version {version!r}, which this replica has not "
                "loaded: retry (through another replica); every replica sharing a session store must load the same "
                "versions (ReloadModels on any replica reloads them all)"
            )
        form, last_token, top_k, created, last_used = _HEADER.unpack(fields[b"hdr"])
        if form != FORMAT:
            raise NotFound(f"session {session_id} is stored in format {form}, this replica reads {FORMAT}")
        states = np.frombuffer(fields[b"st"], np.float32).reshape(2, 2, model.layers, model.hidden)
        request = fields.get(b"req")
        last_request = record_from_json(json.loads(request), session_id) if request else None
        return Session(session_id, model, top_k, states[0], states[1], last_token, int(fields[b"pos"]), created,
                       last_used, last_request, owner=fields[b"owner"].decode())  # fmt: skip


def _script(pipe: Any, script: Any, keys: str | tuple[str, ...], args: tuple[Any, ...]) -> None:
    """Queue a Lua script on a pipeline by its hash; the pipeline loads it first if Redis lacks it."""
    keys = (keys,) if isinstance(keys, str) else keys
    pipe.scripts.add(script)
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def _version_key(model: Model) -> str:
    return f"{VERSION}{model.name}/{model.version}"


def _serving_key(model: Model) -> str:
    return f"{SERVING}{model.name}/{model.version}"


def _now_ms() -> int:
    return int(time.time() * 1000)
