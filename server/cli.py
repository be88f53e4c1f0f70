"""``lstmd-server``: parse settings, then run the server until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from server.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = Path(settings.models_dir)
    if not models.is_dir() or not any(models.iterdir()):
        print(
            f"lstmd-server: no models in {models}. The bundled default model is not built yet; "
            "see README (lstmd-export train / onnx) or pass --models-dir.",
            file=sys.stderr,
        )
        return 2
    print("lstmd-server: serving is not implemented yet", file=sys.stderr)
    return 2
