"""The word-level LSTM language model (PyTorch).

This is our model; the exporter accepts any module with the same ``forward`` interface:
``forward(tokens, (h, c)) -> (logits, (h, c))`` with ``tokens`` (batch, time) int64,
``h``/``c`` (layers, batch, hidden) and ``logits`` (batch, time, vocab).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelConfig:
    vocab_size: int
    embed_size: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.3
    tie_weights: bool = True

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer LSTM -> linear decoder (optionally tied to the embedding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.num_layers = config.num_layers
        self.hidden_size = config.hidden_size
        self.drop = nn.Dropout(config.dropout)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        if config.tie_weights and config.embed_size != config.hidden_size:
            raise ValueError("tie_weights needs embed_size == hidden_size")
        self.lstm = nn.LSTM(
            config.embed_size,
            config.hidden_size,
            config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch: int) -> State:
        """Zero (h, c), each (layers, batch, hidden)."""
        weight = self.embedding.weight
        shape = (self.num_layers, batch, self.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self._lstm(tokens, state)
        return self.decoder(self.drop(out)), state  # (batch, time, vocab)

    def forward_last(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Logits of the last step only, (batch, vocab): all serving needs. A prompt of n tokens
        then runs the decoder once instead of n times (it costs more than the LSTM per step)."""
        out, state = self._lstm(tokens, state)
        # The decoder on (batch, 1, hidden): exported as MatMul, not Gemm, which ONNX Runtime's
        # dynamic int8 quantization can quantize, and which ONNX Runtime leaves apart from its
        # bias Add (as a fused Gemm it measured 5 to 11% slower a step at batch 64 and 256). Then a
        # reshape to (batch, vocab), not squeeze(1): on the dynamic time axis the TorchScript
        # export puts a squeeze behind an If, which copied the logits twice and which OpenVINO
        # refuses (and flatten(1) would lose the vocabulary size from the graph's output shape).
        logits = self.decoder(self.drop(out[:, -1:]))  # (batch, 1, vocab)
        return logits.reshape(-1, self.decoder.out_features), state

    def _lstm(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x = self.drop(self.embedding(tokens))  # (batch, time, embed)
        out, state = self.lstm(x, state)  # (batch, time, hidden)
        return out, state
