"""The connection flags every command shares (``lstmd`` and ``lstmd bench``), and the client
options they give: one module both import, so neither imports the other."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lstmd.client._core import DEFAULT_TARGET


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """--target, --timeout, the API key and the TLS files."""
    p.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, in seconds")
    p.add_argument("--api-key", help="API key, for servers that require one (default: $LSTMD_API_KEY, "
                   "which is better: other users of the machine can see flags in the process list)")  # fmt: skip
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    p.add_argument("--tls-ca-file", help="connect with TLS, trusting the CA certificates in this PEM file")
    p.add_argument("--tls-cert-file", help="PEM client certificate, for servers that require one (mutual TLS)")
    p.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """Client keyword arguments from the connection flags: the target, the deadline, TLS files and the API key."""

    def read(flag: str, name: str | None) -> bytes | None:
        try:
            return Path(name).read_bytes() if name else None
        except OSError as e:
            raise SystemExit(f"lstmd: {flag} {name}: {e.strerror}") from None

    if bool(args.tls_cert_file) != bool(args.tls_key_file):  # a usage error: exit 2, as argparse's are
        print("lstmd: --tls-cert-file and --tls-key-file go together (mutual TLS): give both", file=sys.stderr)
        raise SystemExit(2)
    return {
        "target": args.target,
        "timeout": args.timeout,
        "tls": args.tls,
        "root_certificates": read("--tls-ca-file", args.tls_ca_file),
        "certificate_chain": read("--tls-cert-file", args.tls_cert_file),
        "private_key": read("--tls-key-file", args.tls_key_file),
        "api_key": args.api_key or os.environ.get("LSTMD_API_KEY") or None,
        "wait_for_restart_s": 0.0,  # a command (or a benchmark) reports a down server at once
    }
