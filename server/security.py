"""Who may call: TLS server credentials, and API keys with the caller's key id.

API keys come from ``--api-keys-file`` (one ``[name:]key`` a line; blank lines and lines starting
with ``#`` are skipped) and from ``LSTMD_API_KEYS`` (``[name:]key`` entries, comma separated).
Each key has an id that is not secret: its name, or ``key-`` and 12 hex digits of its SHA-256
when it has none. The id is what the server logs, counts quotas by and stores as a session's
owner; the keys themselves are kept only as SHA-256 digests and are never logged.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from lstmd.server.errors import Unauthenticated
from lstmd.server.settings import Settings

# The API key id of the call being handled ("" when keys are off). Set by the AuthInterceptor:
# grpc.aio runs a call's interceptors and then its handler in one task of the call's own, so
# the value set for a call is seen by that call's handler only.
caller: contextvars.ContextVar[str] = contextvars.ContextVar("lstmd_caller", default="")

MIN_KEY_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces, as gRPC metadata allows
_MAKE_KEY = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'


class SecurityConfigError(Exception):
    """A TLS file or an API key cannot be used; the server refuses to start. The message names
    where the problem is (file and line), never a key."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes  # SHA-256 of the key


class KeyRing:
    """The accepted API keys."""

    def __init__(self, keys: Iterable[ApiKey]):
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The id of the key in ``authorization: Bearer <key>``; Unauthenticated without a valid one.

        The presented key's digest is compared with every key's, in constant time and without
        stopping at a match, so the time taken says nothing about which key (if any) matched."""
        value = next((v for k, v in metadata if k == "authorization"), None)
        if value is None:
            raise Unauthenticated(
                "this server requires an API key: send the metadata 'authorization: Bearer <key>' "
                "(lstmd client: api_key=...; lstmd CLI: --api-key or LSTMD_API_KEY)"
            )
        scheme, _, key = (value.decode(errors="replace") if isinstance(value, bytes) else value).partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <key>'")
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = ""
        for candidate in self.keys:
            if hmac.compare_digest(digest, candidate.digest):
                found = candidate.id
        if not found:
            raise Unauthenticated("the API key is not valid: check it, or ask the server's operator for one")
        return found


def load_keys(settings: Settings) -> KeyRing | None:
    """The keys from ``api_keys_file`` and ``api_keys``; None when neither names any (keys off)."""
    entries = _file_entries("API keys", settings.api_keys_file)  # (where it came from, "[name:]key")
    if settings.api_keys_file and not entries:
        raise SecurityConfigError(f"API keys file {settings.api_keys_file} holds no keys: add one '[name:]key' a line")
    entries += _listed_entries(settings.api_keys, "--api-keys (LSTMD_API_KEYS)")
    if not entries:
        return None
    keys: list[ApiKey] = []
    for where, entry in entries:
        key = _parse(where, entry)
        if any(k.digest == key.digest for k in keys):
            raise SecurityConfigError(f"{where}: the same key is listed twice")
        if any(k.id == key.id for k in keys):
            raise SecurityConfigError(f"{where}: the key name {key.id!r} is used twice; names must be unique")
        keys.append(key)
    return KeyRing(keys)


def _file_entries(what: str, file: str) -> list[tuple[str, str]]:
    """(where, key entry) for each line of ``file`` (none when ""), blank lines and ``#`` comments skipped."""
    if not file:
        return []
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityConfigError(f"{what} file {file}: cannot read it: {e}") from None
    return [(f"{file} line {n}", line.strip()) for n, line in enumerate(lines, start=1)
            if line.strip() and not line.strip().startswith("#")]  # fmt: skip


def _listed_entries(listed: str, setting: str) -> list[tuple[str, str]]:
    """(where, key entry) for each entry of the comma-separated ``listed``."""
    items = [item.strip() for item in listed.split(",")]
    return [(f"{setting} entry {n}", item) for n, item in enumerate(items, start=1) if item]


def _parse(where: str, entry: str) -> ApiKey:
    name, colon, key = entry.partition(":")
    if not colon:
        name, key = "", entry
    elif not _NAME.fullmatch(name):
        raise SecurityConfigError(
            f"{where}: the name before ':' must be 1 to 64 letters, digits or . _ @ - (starting with a letter or digit)"
        )
    if not _KEY.fullmatch(key):
        raise SecurityConfigError(f"{where}: a key is printable ASCII without spaces")
    if len(key) < MIN_KEY_CHARS:
        raise SecurityConfigError(
            f"{where}: the key is shorter than {MIN_KEY_CHARS} characters; make a strong one with: {_MAKE_KEY}"
        )
    digest = hashlib.sha256(key.encode()).digest()
    return ApiKey(name or "key-" + digest.hex()[:12], digest)


MIN_SESSION_KEY_CHARS = 32


def load_session_keys(settings: Settings) -> list[bytes]:
    """The session keys (server.session_blob signs exported sessions with the first and accepts any):
    from ``session_keys_file`` (one a line, blank lines and ``#`` comments skipped), then
    ``session_keys`` (comma separated). Empty when none is configured."""
    entries = _file_entries("session keys", settings.session_keys_file)
    entries += _listed_entries(settings.session_keys, "--session-keys (LSTMD_SESSION_KEYS)")
    keys: list[bytes] = []
    for where, key in entries:
        if not _KEY.fullmatch(key) or len(key) < MIN_SESSION_KEY_CHARS:
            raise SecurityConfigError(f"{where}: a session key is at least {MIN_SESSION_KEY_CHARS} characters of "
                                      f"printable ASCII without spaces; make one with: {_MAKE_KEY}")  # fmt: skip
        if key.encode() in keys:
            raise SecurityConfigError(f"{where}: the same session key is listed twice")
        keys.append(key.encode())
    return keys


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (client certificates required when a client
    CA is given); None for plaintext."""
    if not settings.tls_cert_file:
        return None
    chain = _read_pem(settings.tls_cert_file, "--tls-cert-file")
    key = _read_pem(settings.tls_key_file, "--tls-key-file")
    client_ca = _read_pem(settings.tls_client_ca_file, "--tls-client-ca-file") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def _read_pem(name: str, setting: str) -> bytes:
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{setting} {name}: cannot read it: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{setting} {name}: not a PEM file (expected '-----BEGIN ...')")
    return data
