"""A small re-creation of pytorch/examples' ``word_language_model`` RNNModel, LSTM variant, with its
interface, not lstmd's: time-major ``forward(input (time, batch), hidden) -> (log-softmax
(time * batch, vocab), hidden)``, its state size as ``nlayers`` / ``nhid`` and its ``init_hidden``.
The exporter serves it through ``lstmd.export.adapters.TimeMajorLogSoftmax``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RNNModel(nn.Module):
    """Embedding -> time-major LSTM -> linear decoder -> log-softmax, flattened over time and batch."""

    def __init__(self, ntoken: int, ninp: int = 10, nhid: int = 14, nlayers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)  # (time, batch, features)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid
        self.nlayers = nlayers

    def forward(
        self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        emb = self.drop(self.encoder(input))  # (time, batch, ninp)
        output, hidden = self.rnn(emb, hidden)  # (time, batch, nhid)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)  # (time * batch, ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid)
