"""``lstmd-server``: parse settings, load the models, serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from lstmd._extras import missing_extra
from lstmd.server.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(argv)  # --help works on any install
    try:
        # imported here, so that an install without the server extra says what to do
        from lstmd.server.app import configure_logging, run
        from lstmd.server.registry import ModelError, load_models
        from lstmd.server.security import SecurityConfigError
    except ModuleNotFoundError as e:
        return missing_extra(e, "lstmd-server", "server")
    configure_logging(settings)
    # a SIGHUP (reload) that comes while the models load would end the process: ignored until run() handles it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
