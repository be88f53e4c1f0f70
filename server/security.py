"""Who may call: TLS server credentials."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.settings import Settings


class SecurityConfigError(Exception):
    """A TLS file cannot be used; the server refuses to start. The message names the file."""


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
