"""Adapters: serve a language model whose ``forward`` differs from lstmd's interface.

lstmd serves ``forward(tokens (batch, time) int64, (h, c) each (layers, batch, hidden)) ->
(logits (batch, time, vocab), (h, c))``. An adapter wraps a model with another interface into
that one, and the exporter exports the adapter; the weights stay the wrapped model's own.

- ``TimeMajorLogSoftmax``: pytorch/examples' ``word_language_model`` ``RNNModel`` and models like
  it: ``forward(input (time, batch), hidden) -> (log-softmax (time * batch, vocab), hidden)``,
  with the state size as ``nlayers`` / ``nhid`` and the vocabulary size as ``ntoken``.
- ``BatchFirstLogits``: a batch-first model returning logits whose arguments have other names or
  another order (``forward(hidden, input_ids)``: give ``tokens_arg`` and ``state_arg``), or which
  returns ``(logits, h, c)`` or ``(logits, [h, c])``.

On the command line: ``lstmd-export onnx ... --adapter time-major-logsoftmax``, or
``--adapter batch-first-logits --adapter-kwargs '{"tokens_arg": "input_ids", "state_arg": "hidden"}'``.
In code: ``write_model_dir(TimeMajorLogSoftmax(model), vocab, ...)``, or subclass ``Adapter``
and write its ``forward`` for any other interface.

Log-probabilities serve as logits: the serving graph's log-softmax leaves them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lstmd.export.onnx_export import state_shape

State = tuple[torch.Tensor, torch.Tensor]


class Adapter(nn.Module):
    """Holds the wrapped model as ``model`` and its state size as ``num_layers`` / ``hidden_size``:
    given, or read from its ``nlayers`` / ``nhid`` (word_language_model's names), its
    ``num_layers`` / ``hidden_size``, or its first ``nn.LSTM``."""

    def __init__(self, model: nn.Module, num_layers: int | None = None, hidden_size: int | None = None):
        super().__init__()
        self.model = model
        nlayers, nhid = getattr(model, "nlayers", None), getattr(model, "nhid", None)
        if not (isinstance(nlayers, int) and isinstance(nhid, int)):
            nlayers, nhid = state_shape(model)
        self.num_layers = num_layers or nlayers
        self.hidden_size = hidden_size or nhid


def _state(value: Sequence[Any]) -> State:
    """(h, c) from a tuple or list of two tensors."""
    h, c = value
    return h, c


class TimeMajorLogSoftmax(Adapter):
    """For ``forward(input (time, batch), hidden) -> (log-softmax (time * batch, vocab), hidden)``,
    pytorch/examples' ``word_language_model`` ``RNNModel`` (LSTM): transposes the tokens in and the
    log-probabilities out. ``vocab_size`` defaults to the model's ``ntoken``."""

    def __init__(self, model: nn.Module, vocab_size: int | None = None, **state_size: int):
        super().__init__(model, **state_size)
        vocab = vocab_size or getattr(model, "ntoken", None)
        if not isinstance(vocab, int):
            raise ValueError(f"{type(model).__name__} has no ntoken attribute: give the adapter vocab_size")
        # a Python int, so the exported graph keeps the vocabulary axis fixed (the server checks it)
        self.vocab_size = vocab

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        batch, time = tokens.shape
        logprobs, hidden = self.model(tokens.t(), state)  # (time * batch, vocab), time-major
        return logprobs.view(time, batch, self.vocab_size).transpose(0, 1), _state(hidden)  # (batch, time, vocab)


class BatchFirstLogits(Adapter):
    """For a batch-first model returning logits (batch, time, vocab) through another signature:
    called as ``model(tokens, state)``, or ``model(**{tokens_arg: tokens, state_arg: state})`` when
    the names are given; its result may be ``(logits, (h, c))``, ``(logits, [h, c])`` or
    ``(logits, h, c)``."""

    def __init__(
        self, model: nn.Module, tokens_arg: str | None = None, state_arg: str | None = None, **state_size: int
    ):
        super().__init__(model, **state_size)
        if (tokens_arg is None) != (state_arg is None):
            raise ValueError("give both tokens_arg and state_arg, or neither")
        self.tokens_arg, self.state_arg = tokens_arg, state_arg

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.tokens_arg and self.state_arg:
            out = self.model(**{self.tokens_arg: tokens, self.state_arg: state})
        else:
            out = self.model(tokens, state)
        logits, *rest = out
        return logits, _state(rest[0] if len(rest) == 1 else rest)


ADAPTERS: dict[str, type[Adapter]] = {
    "time-major-logsoftmax": TimeMajorLogSoftmax,
    "batch-first-logits": BatchFirstLogits,
}


def adapt(model: nn.Module, name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``model`` wrapped in the adapter ``name`` of ``ADAPTERS``, in eval mode."""
    if name not in ADAPTERS:
        raise ValueError(f"no adapter {name!r}; there are {', '.join(ADAPTERS)}")
    return ADAPTERS[name](model, **(kwargs or {})).eval()
