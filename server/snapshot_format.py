"""The session snapshot file: its format, and writing and reading it safely.

Layout (all integers little-endian)::

    header   magic        8 bytes   b"LSTMDSNP"
             version      u32       FORMAT_VERSION (2); a reader takes 1 and 2, refuses any other
             length       u64       payload length in bytes
             sha256       32 bytes  SHA-256 of the payload
    payload  count        u32       number of sessions
             count times:
               meta_len   u32       length of meta
               meta       meta_len bytes of UTF-8 JSON: an object with id, model, model_version,
                          top_k, last_token (-1: none, a new session of a model that starts from
                          zeros), position, created, last_used (seconds since the
                          epoch), owner, shape ([2, layers, hidden]) and last_request (JSON or null)
               state      float32 array of that shape, C order: h and c after the last token
               prev_state float32 array of that shape: h and c before the last token
             ended        u32       number of ended-session records (version 2; version 1 ends above)
             ended times:
               meta_len   u32       length of meta
               meta       meta_len bytes of UTF-8 JSON: id, reason, when (seconds since the epoch),
                          owner: why a session ended (server.endings), oldest first

The header is checked before anything else (magic, version, then that the file holds exactly
``length`` payload bytes and that their SHA-256 matches), so a truncated, extended or
corrupted file is refused as a whole. ``read`` checks the header against the file's size before
reading the rest, so a large file that is not a snapshot is refused without reading it, and it
refuses a path that is not a regular file (a FIFO, a folder, a device) without opening it for
long: it never waits for a FIFO's writer. Nothing in a snapshot is executable: it is numbers and
JSON, never pickle, so loading one cannot run code.

A snapshot is written atomically: to a temporary file in the same folder (created anew: whatever
was left under its name is removed first, so a FIFO there cannot block the write), flushed and
fsynced, renamed over the old one, then the folder is fsynced. A crash at any moment leaves the
previous snapshot or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lstmd.server.endings import Ending
from lstmd.server.errors import END_REASONS

MAGIC = b"LSTMDSNP"
FORMAT_VERSION = 2
READS = (1, 2)  # version 1: sessions only
_PREFIX = struct.Struct("<8sI")  # magic, version
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256 of the payload
_U32 = struct.Struct("<I")
_FLOAT32 = np.dtype("<f4")
_META: dict[str, type | tuple[type, ...]] = {  # field: accepted types
    "id": str, "model": str, "model_version": str, "top_k": int, "last_token": int, "position": int,
    "created": (int, float), "last_used": (int, float), "owner": str, "shape": list,
}  # fmt: skip
_ENDED: dict[str, type | tuple[type, ...]] = {"id": str, "reason": str, "when": (int, float), "owner": str}


class SnapshotError(Exception):
    """The file is not a snapshot this server can read. ``kind`` names why, for the file set aside."""

    kind = "corrupt"


class UnsupportedVersion(SnapshotError):
    kind = "unsupported"


class NotRegularFile(SnapshotError):
    """The path is a FIFO, a folder, a device or a socket: nothing a snapshot is ever written as."""

    kind = "not-a-file"


@dataclass
class SessionRecord:
    """One session as the snapshot holds it."""

    id: str
    model: str
    model_version: str
    top_k: int
    last_token: int
    position: int
    created: float
    last_used: float
    owner: str
    state: np.ndarray  # (2, layers, hidden) float32: h and c after the last token
    prev_state: np.ndarray  # (2, layers, hidden): before the last token
    last_request: object = None  # JSON-able: the exactly-once record, or None


class Contents(NamedTuple):
    sessions: list[SessionRecord]
    endings: list[Ending]  # oldest first; none in a version 1 file


def encode(records: Sequence[SessionRecord], endings: Sequence[Ending] = ()) -> bytes:
    """The whole file's bytes."""
    payload = b"".join(_payload(records, len(records), endings))
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def decode(data: bytes) -> list[SessionRecord]:
    """The session records of a file's bytes. Raises SnapshotError (UnsupportedVersion for another format)."""
    return decode_all(data).sessions


def decode_all(data: bytes) -> Contents:
    """The sessions and ended-session records of a file's bytes; raises as ``decode``."""
    version, length, digest = _check_header(data[: _HEADER.size], len(data))
    return _check_payload(memoryview(data)[_HEADER.size : _HEADER.size + length], digest, version)


def _check_header(head: bytes, size: int) -> tuple[int, int, bytes]:
    """The version, payload length and SHA-256 from ``head``, the first bytes of a file of ``size``
    bytes, checked against that size. Raises SnapshotError (UnsupportedVersion for another format)."""
    if len(head) < _PREFIX.size:
        raise SnapshotError(f"truncated: {size} bytes, shorter than the header")
    magic, version = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise SnapshotError(f"not an lstmd snapshot (starts with {magic!r}, expected {MAGIC!r})")
    if version not in READS:
        raise UnsupportedVersion(f"format version {version}; this lstmd reads versions {READS[0]} to {READS[-1]}")
    if len(head) < _HEADER.size:
        raise SnapshotError(f"truncated: {size} bytes, shorter than the header")
    _, _, length, digest = _HEADER.unpack_from(head)
    held = size - _HEADER.size
    if held != length:
        what = "truncated" if held < length else "extra bytes"
        raise SnapshotError(f"{what}: the header announces {length} payload bytes, the file holds {held}")
    return version, length, digest


def _check_payload(payload: memoryview, digest: bytes, version: int) -> Contents:
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("checksum mismatch: the payload is not what was written")
    try:
        return _parse(payload, version)
    except (ValueError, TypeError, KeyError, struct.error) as e:  # only a writer bug gets here past the checksum
        raise SnapshotError(f"malformed payload: {e}") from e


def write(path: Path, records: Iterable[SessionRecord], count: int, endings: Sequence[Ending] = ()) -> int:
    """Write the ``count`` records and the ``endings`` atomically (temporary file, fsync, rename, fsync
    of the folder). Returns the file's size in bytes. Raises OSError and leaves the previous snapshot
    in place. ``records`` may be a generator: each record is encoded and dropped in turn."""
    temporary = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # a leftover, or a FIFO that would block the open below until a reader came
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb", buffering=1 << 20) as f:
            f.write(bytes(_HEADER.size))  # filled in once the payload's length and checksum are known
            digest, length = hashlib.sha256(), 0
            for chunk in _payload(records, count, endings):
                f.write(chunk)
                digest.update(chunk)
                length += len(chunk)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, length, digest.digest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return _HEADER.size + length


def read(path: Path) -> list[SessionRecord]:
    """The session records in ``path``; raises as ``read_all``."""
    return read_all(path).sessions


def read_all(path: Path) -> Contents:
    """The sessions and ended-session records in ``path``. Raises FileNotFoundError, other OSErrors, or SnapshotError:
    NotRegularFile for a path that is not a regular file. The header is read and checked against
    the file's size first, so a file that is not a snapshot is refused without reading the rest."""
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO put there since: open, never wait
    try:
        info = os.fstat(fd)
        _check_regular(info.st_mode)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        version, length, digest = _check_header(f.read(_HEADER.size), info.st_size)
        payload = f.read(length)
        extra = len(f.read(1))  # the file changed since fstat: refused like any other size mismatch
    if len(payload) != length or extra:
        what = "truncated" if len(payload) < length else "extra bytes"
        raise SnapshotError(f"{what}: the header announces {length} payload bytes, the file changed while read")
    return _check_payload(memoryview(payload), digest, version)


def _check_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    kind = next((name for test, name in kinds if test(mode)), "not a file")
    raise NotRegularFile(f"not a regular file but {kind}")


def set_aside(path: Path, kind: str) -> Path:
    """Rename a refused file to ``<name>.<kind>-<UTC time>`` beside it, so it is kept and not overwritten."""
    aside = path.with_name(f"{path.name}.{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(path, aside)
    return aside


def _payload(records: Iterable[SessionRecord], count: int, endings: Sequence[Ending]) -> Iterator[bytes]:
    yield _U32.pack(count)
    written = 0
    for r in records:
        written += 1
        if r.state.shape != r.prev_state.shape or r.state.ndim != 3:
            raise ValueError(f"session {r.id}: state {r.state.shape} and prev_state {r.prev_state.shape}")
        meta = json.dumps({
            "id": r.id, "model": r.model, "model_version": r.model_version, "top_k": r.top_k,
            "last_token": r.last_token, "position": r.position, "created": r.created, "last_used": r.last_used,
            "owner": r.owner, "shape": list(r.state.shape), "last_request": r.last_request,
        }).encode()  # fmt: skip
        yield _U32.pack(len(meta)) + meta
        yield np.ascontiguousarray(r.state, _FLOAT32).tobytes()
        yield np.ascontiguousarray(r.prev_state, _FLOAT32).tobytes()
    if written != count:
        raise ValueError(f"{written} records, {count} announced")
    yield _U32.pack(len(endings))
    for e in endings:
        meta = json.dumps({"id": e.id, "reason": e.reason, "when": e.when, "owner": e.owner}).encode()
        yield _U32.pack(len(meta)) + meta


def _meta(payload: memoryview, offset: int, fields: dict[str, type | tuple[type, ...]]) -> tuple[dict[str, Any], int]:
    """The JSON object at ``offset`` (its length first), checked to hold ``fields``; and the offset after it."""
    (meta_len,) = _U32.unpack_from(payload, offset)
    offset += _U32.size
    meta = json.loads(bytes(payload[offset : offset + meta_len]))
    for name, kind in fields.items():
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise TypeError(f"{name} is {meta[name]!r}")
    return meta, offset + meta_len


def _parse(payload: memoryview, version: int) -> Contents:
    (count,) = _U32.unpack_from(payload)
    offset, records = _U32.size, []
    for _ in range(count):
        meta, offset = _meta(payload, offset, _META)
        shape = tuple(meta["shape"])
        if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"state shape {shape}")
        arrays = []
        for _ in range(2):
            size = _FLOAT32.itemsize * math.prod(shape)
            if offset + size > len(payload):
                raise ValueError("the payload ends inside a state array")
            arrays.append(np.frombuffer(payload, _FLOAT32, size // _FLOAT32.itemsize, offset).reshape(shape))
            offset += size
        records.append(SessionRecord(
            meta["id"], meta["model"], meta["model_version"], meta["top_k"], meta["last_token"], meta["position"],
            float(meta["created"]), float(meta["last_used"]), meta["owner"],
            arrays[0].astype(np.float32), arrays[1].astype(np.float32), meta.get("last_request"),
        ))  # fmt: skip
    endings = []
    if version >= 2:
        (count,) = _U32.unpack_from(payload, offset)
        offset += _U32.size
        for _ in range(count):
            meta, offset = _meta(payload, offset, _ENDED)
            if meta["reason"] not in END_REASONS:
                raise ValueError(f"ended session {meta['id']!r}: unknown reason {meta['reason']!r}")
            endings.append(Ending(meta["id"], meta["reason"], float(meta["when"]), meta["owner"]))
    if offset != len(payload):
        raise ValueError(f"{len(payload) - offset} bytes after the last record")
    return Contents(records, endings)
