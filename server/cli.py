"""``lstmd-server``: parse settings, load the models, serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from lstmd.server.settings import Settings

# What the server extra adds to the client's install (pip install 'lstmd[server]')
SERVER_MODULES = {"numpy", "onnxruntime", "prometheus_client", "grpc_reflection"}


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(argv)  # --help works on any install
    try:
        # imported here, so that an install without the server extra says what to do
        from lstmd.server.app import configure_logging, run
        from lstmd.server.registry import ModelError, load_models
        from lstmd.server.security import SecurityConfigError
    except ModuleNotFoundError as e:
        if e.name not in SERVER_MODULES:
            raise
        print(f"lstmd-server: this install lacks {e.name}, which the server needs: pip install 'lstmd[server]'",
              file=sys.stderr)  # fmt: skip
        return 2
    configure_logging(settings)
    try:
        registry = load_models(settings)
    except ModelError as e:
        print(f"lstmd-server: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(settings, registry))
    except SecurityConfigError as e:
        print(f"lstmd-server: {e}", file=sys.stderr)
        return 2
    return 0
