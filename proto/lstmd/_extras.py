"""The optional parts of the install: what each extra adds to the client's base install."""

from __future__ import annotations

import sys

EXTRAS = {
    "server": {"numpy", "onnxruntime", "prometheus_client", "grpc_reflection", "cryptography"},
    "export": {"torch", "onnx", "onnxscript", "tqdm", "numpy", "onnxruntime"},
}


def missing_extra(error: ModuleNotFoundError, program: str, extra: str) -> int:
    """For a module of ``extra`` that this install lacks: say which pip line adds it, and return
    the exit status 2. Any other missing module is a bug, raised again."""
    if error.name not in EXTRAS[extra]:
        raise error
    print(f"{program}: this install lacks {error.name}, which it needs: pip install 'lstmd[{extra}]'", file=sys.stderr)
    return 2
