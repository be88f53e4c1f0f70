"""A user's own PyTorch LSTM language model, not lstmd's: other sizes, no weight tying, a
time-major LSTM inside. It follows the documented interface:
``forward(tokens (batch, time), (h, c)) -> (logits (batch, time, vocab), (h, c))``."""

from __future__ import annotations

import torch
from torch import nn


class UserLM(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 12, hidden: int = 20, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = nn.LSTM(embed, hidden, layers)  # time-major: (time, batch, features)
        self.head = nn.Sequential(nn.Linear(hidden, 32), nn.Tanh(), nn.Linear(32, vocab_size))

    def forward(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.rnn(self.embed(tokens).transpose(0, 1), state)  # (time, batch, hidden)
        return self.head(out.transpose(0, 1)), state
