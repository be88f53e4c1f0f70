"""The export's refusals: ``lstmd-export`` prints their message and exits 1, without a traceback.

Pure Python, so the command line can catch them without importing torch."""

from __future__ import annotations


class ExportError(Exception):
    """A model cannot be exported, verified or published as asked; the message says why and what to do."""
