"""Publish a model folder: write it beside its place, check it as lstmd-server will, then move it in.

A models folder is what ``lstmd-server`` loads at start, and one broken or empty version folder
stops the server. So an export writes into a temporary folder beside the target, runs the
server's own checks on it (``lstmd.model.folder.read_model_dir`` and ``lstmd.model.graph.check``,
as ``lstmd.server.registry`` does), and only then renames it into place. On failure nothing is
left behind, not even a model's name folder it created. An existing version is replaced only
when asked.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lstmd.export.errors import ExportError
from lstmd.model import graph
from lstmd.model.folder import ONNX_FILE, ModelFormatError, read_model_dir


class PublishError(ExportError):
    """The model folder cannot be published; the message says why."""


def _beside(target: Path, kind: str) -> Path:
    """A new name in target's folder, hidden (so it sorts below every numbered version)."""
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"


@contextmanager
def staged(target: Path, replace: bool = False) -> Iterator[Path]:
    """A new empty folder beside ``target`` to write a model folder into. When the block ends
    without an exception it becomes ``target``, replacing an existing one only if ``replace``;
    otherwise it is removed, with the parent folders this call created."""
    if target.exists() and not replace:
        raise PublishError(f"{target} already exists: export to another --version, or give --force to replace it")
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    work = _beside(target, "partial")
    work.mkdir()
    try:
        yield work
        if target.exists():
            old = _beside(target, "replaced")
            target.rename(old)
            work.rename(target)
            shutil.rmtree(old)
        else:
            work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def check_servable(folder: Path, name: str) -> None:
    """Check ``folder`` as lstmd-server checks a model it loads: files, card, checksum and
    vocabulary, the graph's inputs and outputs against the card, the card's name against ``name``
    (its name folder), and a first step from the zero state, as a new session takes: the
    tokenizer's initial token, or for a model that starts from zeros, token 0 (any token may be a
    session's first). Raises PublishError."""
    try:
        card, tokenizer = read_model_dir(folder)
        session = graph.load(folder / ONNX_FILE)
        graph.check(session, card)
    except ModelFormatError as e:
        raise PublishError(f"lstmd-server would refuse this model: {e}") from e
    if card.name != name:
        raise PublishError(
            f"lstmd-server would refuse this model: its card names it {card.name!r}, its folder {name!r}"
        )
    zero = np.zeros((card.num_layers, 1, card.hidden_size), np.float32)
    try:
        first = 0 if tokenizer.initial_id is None else tokenizer.initial_id
        graph.run(session, np.array([[first]], np.int64), zero, zero, 1)
    except Exception as e:  # ONNX Runtime's own error types
        raise PublishError(f"lstmd-server would refuse this model: its first step fails: {e}") from e
