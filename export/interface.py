"""Check a language model's ``forward`` against lstmd's interface before exporting it.

A model that does not follow the interface often still exports (tracing records whatever the
module does), and then fails verification with differences that say nothing about the cause, or
serves nonsense. Running it once on a small batch and looking at what comes back names the
problem instead: what was expected, what came back, and which adapter fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lstmd.export.errors import ExportError

INTERFACE = (
    "forward(tokens (batch, time) int64, (h, c) each (layers, batch, hidden)) -> (logits (batch, time, vocab), (h, c))"
)
HOW_TO_ADAPT = (
    "A model with another interface exports through an adapter: --adapter time-major-logsoftmax for "
    "pytorch/examples' word_language_model RNNModel (time-major input, log-softmax flattened to "
    "(time * batch, vocab)), --adapter batch-first-logits for other argument names (--adapter-kwargs "
    '\'{"tokens_arg": ..., "state_arg": ...}\') or a (logits, h, c) result, or an adapter of your own '
    "(see lstmd.export.adapters)."
)


VOCAB_HINT = " (is --vocab the vocabulary the model was trained with?)"


class ModelInterfaceError(ExportError, ValueError):
    """The model's forward does not follow lstmd's interface; the message says how not, and what to do."""


def describe(value: Any) -> str:
    """A result's structure: tensors as their shapes, tuples and lists as their items."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        items = ", ".join(describe(v) for v in value)
        return f"({items})" if isinstance(value, tuple) else f"[{items}]"
    return type(value).__name__


def _problem(out: Any, logits_shape: tuple[int, ...], state: tuple[int, int, int]) -> str | None:
    """What is wrong with ``out`` as ``(logits of logits_shape, (h, c) of state)``; None if nothing."""
    if not (isinstance(out, tuple | list) and len(out) == 2):
        return "the result is not a pair (logits, (h, c))"
    logits, hc = out
    if not isinstance(logits, torch.Tensor):
        return "the logits are not a tensor"
    if not (isinstance(hc, tuple | list) and len(hc) == 2 and all(isinstance(t, torch.Tensor) for t in hc)):
        return "the state is not a pair of tensors (h, c)"
    batch, vocab = logits_shape[0], logits_shape[-1]
    shape = tuple(logits.shape)
    if shape != logits_shape:
        if len(logits_shape) == 3 and shape == (batch * logits_shape[1], vocab):
            return "the logits are flattened over batch and time"
        if len(logits_shape) == 3 and shape == (logits_shape[1], batch, vocab):
            return "the logits are time-major (time, batch, vocab)"
        if shape[:-1] == logits_shape[:-1]:
            return f"the logits have {shape[-1]} entries per step and the vocabulary {vocab} words{VOCAB_HINT}"
        return f"the logits are {shape}, expected {logits_shape}"
    for name, tensor in zip("hc", hc, strict=True):
        if tuple(tensor.shape) != state:
            return f"{name} is {tuple(tensor.shape)}, expected {state}"
    if not logits.is_floating_point():
        return f"the logits are {logits.dtype}, expected floating point"
    return None


@torch.no_grad()
def check_forward(lm: nn.Module, vocab_size: int, layers: int, hidden: int) -> None:
    """Run ``lm`` (and its ``forward_last``, if any) once on a batch of 2 sequences of 3 tokens, from
    a zero state of ``layers`` x ``hidden``, and check what comes back against the interface.
    Raises ModelInterfaceError."""
    name = type(lm).__name__
    batch, time = 2, 3  # distinct, so a model that swaps them shows it
    tokens = torch.zeros(batch, time, dtype=torch.long)
    state = (layers, batch, hidden)
    calls: list[tuple[str, Callable[..., Any], tuple[int, ...]]] = [("forward", lm, (batch, time, vocab_size))]
    forward_last = getattr(lm, "forward_last", None)
    if callable(forward_last):
        calls.append(("forward_last", forward_last, (batch, vocab_size)))
    for method, call, logits_shape in calls:
        expected = f"expected {INTERFACE}" + (", the logits of the last step only" if method == "forward_last" else "")
        given = f"{name}.{method}(tokens {(batch, time)}, (h, c) each {state})"
        try:
            out = call(tokens, (torch.zeros(state), torch.zeros(state)))
        except Exception as e:
            raise ModelInterfaceError(f"{given} raised {type(e).__name__}: {e}\n{expected}.\n{HOW_TO_ADAPT}") from e
        problem = _problem(out, logits_shape, state)
        if problem:
            hint = "" if problem.endswith(VOCAB_HINT) else f"\n{HOW_TO_ADAPT}"
            raise ModelInterfaceError(
                f"{given} returned {describe(out)}: {problem}.\n"
                f"{expected}, here (logits {logits_shape}, (h {state}, c {state})).{hint}"
            )
