"""Portable session state: one session as a blob its holder keeps and any server with the same
session key (LSTMD_SESSION_KEYS) and model version turns back into the same session
(ExportSession, ImportSession).

Layout (all integers little-endian)::

    header  magic       8 bytes   b"LSTMDSES"
            version     u16       FORMAT_VERSION (1); a reader refuses any other
            flags       u16       bit 0: the body is encrypted; no other bit is used
            key id      8 bytes   the first 8 bytes of SHA-256 of the MAC key (below) of the session
                                  key that signed: the reader picks its key by it (it is not the key)
            length      u32       body length in bytes
    body    plain:      meta_len u32, meta (meta_len bytes of UTF-8 JSON), state, prev_state
            encrypted:  nonce (12 random bytes), then AES-256-GCM of the plain body under the
                        encryption key, with the header as associated data (ciphertext, 16-byte tag)
    mac     32 bytes    HMAC-SHA-256 of header and body under the MAC key

    meta        an object: id, model, model_version, position, last_token (-1: none, a new session
                of a model that starts from zeros), top_k, created and exported_at (seconds since
                the epoch), owner (the API key id the session belongs to, "" when keys are off),
                shape ([2, layers, hidden]) and last_request (server.exactly_once's JSON, or null)
    state       float32 array of that shape, C order: h and c after the last token
    prev_state  float32 array of that shape: h and c before the last token

The MAC key and the encryption key are derived from the session key by HKDF-SHA-256 with labels of
their own, so neither is ever the key itself. A reader checks the size, magic, version and key id,
then the MAC (compared in constant time) before it reads anything else, so a blob changed in any
byte, cut short, extended, or signed with a key the server lacks is refused whole; only then does
it decrypt and parse. Every refusal is ``BlobError`` (INVALID_ARGUMENT) with a message that says
what to do. Nothing in a blob is executable: numbers and JSON, never pickle.

A plain blob is authenticated, not secret: its holder can read the state and the last exactly-once
feed (its tokens and candidates). Encrypted, it shows only the header: the holder learns nothing of
the session, not even its id or model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lstmd.server.errors import InvalidInput, PermissionDenied
from lstmd.server.exactly_once import record_from_json, record_to_json
from lstmd.server.registry import Model
from lstmd.server.sessions import Session, check_id, unfit

MAGIC = b"LSTMDSES"
FORMAT_VERSION = 1
ENCRYPTED = 1  # flags bit 0
_HEADER = struct.Struct("<8sHH8sI")  # magic, version, flags, key id, body length
_U32 = struct.Struct("<I")
_MAC_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16  # AES-GCM's authentication tag, after the ciphertext
_FLOAT32 = np.dtype("<f4")
MAX_BLOB_BYTES = 64 << 20  # far above any session (gRPC's message limit comes first): a bound, not a budget
_MAC_LABEL = b"lstmd session blob v1: MAC"
_ENCRYPTION_LABEL = b"lstmd session blob v1: encryption"
_META: dict[str, type | tuple[type, ...]] = {  # field: accepted types
    "id": str, "model": str, "model_version": str, "position": int, "last_token": int, "top_k": int,
    "created": (int, float), "exported_at": (int, float), "owner": str, "shape": list,
}  # fmt: skip
_UNCHANGED = "give ImportSession the bytes ExportSession returned, unchanged"


class BlobError(InvalidInput):
    """Not a session blob this server can import: not one at all, changed, or signed with another key."""


@dataclass(frozen=True)
class _Key:
    id: bytes
    mac: bytes
    encryption: bytes


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


def _key(secret: bytes) -> _Key:
    mac = _derive(secret, _MAC_LABEL)
    return _Key(hashlib.sha256(mac).digest()[:8], mac, _derive(secret, _ENCRYPTION_LABEL))


class SessionBlobs:
    """Seals sessions into blobs and opens them, with the operator's session keys: the first signs
    (and encrypts), every one opens (rotation: put the new key first, keep the old ones after it
    until no blob signed with them is left)."""

    def __init__(self, keys: list[bytes]):
        if not keys:
            raise ValueError("no session keys")
        self._signer = _key(keys[0])
        self._keys = {k.id: k for k in map(_key, keys)}

    def seal(self, session: Session, encrypt: bool) -> bytes:
        """The blob of ``session`` as it is now (the caller holds its lock)."""
        shape = session.state.shape  # (2, layers, hidden)
        meta = json.dumps({
            "id": session.id, "model": session.model.name, "model_version": session.model.version,
            "position": session.position, "last_token": session.last_token, "top_k": session.top_k,
            "created": session.created, "exported_at": time.time(), "owner": session.owner, "shape": list(shape),
            "last_request": record_to_json(session.last_request),
        }).encode()  # fmt: skip
        body = b"".join((_U32.pack(len(meta)), meta, np.ascontiguousarray(session.state, _FLOAT32).tobytes(),
                         np.ascontiguousarray(session.prev_state, _FLOAT32).tobytes()))  # fmt: skip
        key, flags = self._signer, ENCRYPTED if encrypt else 0
        length = len(body) + (_NONCE_BYTES + _TAG_BYTES if encrypt else 0)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, key.id, length)
        if encrypt:
            nonce = os.urandom(_NONCE_BYTES)
            body = nonce + AESGCM(key.encryption).encrypt(nonce, body, header)
        signed = header + body
        return signed + hmac.digest(key.mac, signed, "sha256")

    def open(
        self, blob: bytes, owner: str, find_model: Callable[[str, str], Model], new_id: Callable[[], str] | None
    ) -> Session:
        """The session in ``blob``, if ``owner`` (the caller's API key id) exported it, on the model
        ``find_model(name, version)`` returns (it raises when this server has not loaded that version),
        with the id ``new_id()`` makes, or the blob's id when None. PermissionDenied for another key's
        blob, before anything of the blob is looked up: its holder learns nothing of its model.
        Raises BlobError for anything that is not a blob sealed by one of the keys."""
        key, header, body = self._verified(blob)
        flags = _HEADER.unpack_from(header)[2]
        if flags & ~ENCRYPTED:
            raise BlobError(f"the blob sets flags {flags:#x} this server does not know: export it again here")
        if flags & ENCRYPTED:
            try:
                body = AESGCM(key.encryption).decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], header)
            except (InvalidTag, ValueError):  # only a writer's bug gets here past the MAC
                raise BlobError(f"the blob cannot be decrypted: {_UNCHANGED}") from None
        try:
            meta, state, prev_state = _parse(memoryview(body))
        except (ValueError, TypeError, KeyError, struct.error) as e:  # only a writer's bug gets here past the MAC
            raise BlobError(f"the blob's contents are malformed ({e}): export the session again") from None
        if meta["owner"] != owner:  # the message names the caller's key only
            caller = f"API key {owner!r}" if owner else "no API key (keys are off here)"
            raise PermissionDenied(f"the blob was exported under another API key than this call's ({caller}): "
                                   "import it with the key that exported it")  # fmt: skip
        model = find_model(meta["model"], meta["model_version"])
        fault = unfit(model, state.shape, meta["last_token"], meta["position"])
        if meta["top_k"] < 1:
            fault = f"top_k {meta['top_k']}"
        if fault is not None:  # only a writer's bug gets here past the MAC
            raise BlobError(f"the blob's session does not fit {model.name} version {model.version}: {fault}")
        session_id = meta["id"] if new_id is None else new_id()
        try:
            last_request = record_from_json(meta.get("last_request"), session_id)
        except (KeyError, TypeError, ValueError) as e:
            raise BlobError(f"the blob's exactly-once record is malformed ({e!r}): export the session again") from None
        return Session(session_id, model, meta["top_k"], state, prev_state, meta["last_token"], meta["position"],
                       float(meta["created"]), time.time(), last_request, owner=meta["owner"])  # fmt: skip

    def _verified(self, blob: bytes) -> tuple[_Key, bytes, bytes]:
        """The signing key, header and body of ``blob`` once its MAC checks out; BlobError otherwise."""
        if len(blob) < _HEADER.size + _MAC_BYTES or not blob.startswith(MAGIC):
            start = blob[: len(MAGIC)]
            raise BlobError(f"not an lstmd session blob ({len(blob):,} bytes starting with {start!r}, expected "
                            f"{MAGIC!r} and at least {_HEADER.size + _MAC_BYTES} bytes): {_UNCHANGED}")  # fmt: skip
        if len(blob) > MAX_BLOB_BYTES:
            raise BlobError(f"the blob is {len(blob):,} bytes, more than any session's ({MAX_BLOB_BYTES:,}): "
                            f"{_UNCHANGED}")  # fmt: skip
        _, version, _, key_id, length = _HEADER.unpack_from(blob)
        if version != FORMAT_VERSION:
            raise BlobError(f"session blob format version {version}; this server reads version {FORMAT_VERSION} "
                            "(a blob from a newer lstmd, or a changed one): import it on a server of the version "
                            "that exported it")  # fmt: skip
        held = len(blob) - _HEADER.size - _MAC_BYTES
        if held != length:
            what = "cut short" if held < length else "extended"
            raise BlobError(f"the blob was {what}, or its header changed: the header announces {length:,} body bytes, "
                            f"it holds {held:,}; {_UNCHANGED}")  # fmt: skip
        key = self._keys.get(key_id)
        if key is None:
            raise BlobError(f"the blob is signed with a session key this server does not have (key id "
                            f"{key_id.hex()}), or it was changed: import it on a server with that key in "
                            "LSTMD_SESSION_KEYS, or add the key there after this server's own")  # fmt: skip
        signed = blob[:-_MAC_BYTES]
        if not hmac.compare_digest(hmac.digest(key.mac, signed, "sha256"), blob[-_MAC_BYTES:]):
            raise BlobError(f"the blob was changed or damaged (its MAC does not match): {_UNCHANGED}")
        return key, signed[: _HEADER.size], signed[_HEADER.size :]


def _parse(body: memoryview) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The meta, state and prev_state of a plain body."""
    (meta_len,) = _U32.unpack_from(body)
    if _U32.size + meta_len > len(body):
        raise ValueError("the body ends inside the metadata")
    meta = json.loads(bytes(body[_U32.size : _U32.size + meta_len]))
    if not isinstance(meta, dict):
        raise TypeError("the metadata is not an object")
    for name, kind in _META.items():
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise TypeError(f"{name} is {meta[name]!r}")
    check_id(meta["id"])
    shape = tuple(meta["shape"])
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"state shape {shape}")
    size = _FLOAT32.itemsize * math.prod(shape)
    offset = _U32.size + meta_len
    if offset + 2 * size != len(body):
        raise ValueError(f"{len(body) - offset:,} state bytes, the shape {shape} takes {2 * size:,}")
    arrays = [np.frombuffer(body, _FLOAT32, size // _FLOAT32.itemsize, offset + i * size).reshape(shape)
              for i in range(2)]  # fmt: skip
    return meta, arrays[0].astype(np.float32), arrays[1].astype(np.float32)
