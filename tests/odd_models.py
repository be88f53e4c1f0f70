"""Language models that do not follow lstmd's interface, each in its own way, for the export's
checks: ``forward(tokens (batch, time), (h, c)) -> (logits (batch, time, vocab), (h, c))``."""

from __future__ import annotations

import torch
from torch import nn

from lstmd.export.adapters import TimeMajorLogSoftmax
from tests.word_language_model import RNNModel

State = tuple[torch.Tensor, torch.Tensor]


class _BatchFirst(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 8, hidden: int = 12, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab_size)

    def _run(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self.lstm(self.embedding(tokens), state)  # (batch, time, hidden)
        return self.decoder(out), state  # (batch, time, vocab)


class StateFirstLM(_BatchFirst):
    """Batch-first and returning logits, but with its own argument order and names."""

    def forward(self, hidden: State, input_ids: torch.Tensor) -> tuple[torch.Tensor, State]:
        return self._run(input_ids, hidden)


class SplitStateLM(_BatchFirst):
    """Returns ``(logits, h, c)`` rather than ``(logits, (h, c))``."""

    def forward(self, x: torch.Tensor, hidden: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, (h, c) = self._run(x, hidden)
        return logits, h, c


class NoStateLM(_BatchFirst):
    """Takes no state: a wrong signature."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens, None)[0]  # type: ignore[arg-type]  # nn.LSTM starts from zeros


class FlatLogitsLM(_BatchFirst):
    """Returns its logits flattened to (batch * time, vocab): a wrong output shape."""

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, state = self._run(tokens, state)
        return logits.reshape(-1, logits.shape[-1]), state


class TimeMajorOutLM(_BatchFirst):
    """Returns its logits time-major, (time, batch, vocab): a wrong output shape."""

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, state = self._run(tokens, state)
        return logits.transpose(0, 1), state


class UnfixedVocab(TimeMajorLogSoftmax):
    """An adapter of word_language_model's RNNModel that reshapes with -1: right in PyTorch, but the
    exported graph's log-probabilities are (batch, None), which lstmd-server refuses."""

    def __init__(self, ntoken: int):
        super().__init__(RNNModel(ntoken))

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        batch, time = tokens.shape
        logprobs, hidden = self.model(tokens.t(), state)  # (time * batch, vocab)
        return logprobs.view(time, batch, -1).transpose(0, 1), hidden
