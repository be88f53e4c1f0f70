"""``lstmd-server``: parse settings, load the models, serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from server.app import configure_logging, run
from server.models import ModelError, load_models
from server.security import SecurityConfigError
from server.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(argv)
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
