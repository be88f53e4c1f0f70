"""TorchServe handler: the word-level LSTM LM, one token per request, (h, c) kept per sequence id.

Runs inside TorchServe's Python worker (``.venv-torchserve``), not in the project's venv. With
``sequenceBatching`` TorchServe hands ``handle`` at most one request per sequence in a batch, each
tagged with its sequence id; the handler gathers those sequences' states, runs the whole batch as
one forward, and stores the new states back. A request's body is a token id; the reply is the top-1
next word id and its probability, as JSON (what lstmd answers with top_k=1).

States live in an LRU dict of ``capacity`` sequences (model-config.yaml, ``handler:``): TorchServe
does not tell the worker when a sequence ends, so the oldest are dropped once it is full.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lstmd.export.model import LSTMLanguageModel, ModelConfig
else:  # export/model.py, archived as the model file
    from model import LSTMLanguageModel, ModelConfig

logger = logging.getLogger(__name__)


class LSTMStepHandler:
    """One LM step for each sequence in a batch, with that sequence's (h, c)."""

    def __init__(self) -> None:
        self.initialized = False
        self.model: LSTMLanguageModel | None = None
        self.states: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.capacity = 1024

    def initialize(self, context: Any) -> None:
        settings = (context.model_yaml_config or {}).get("handler") or {}
        torch.set_num_threads(int(settings.get("threads", 1)))
        self.capacity = int(settings.get("capacity", self.capacity))
        model_dir = context.system_properties["model_dir"]
        saved = torch.load(os.path.join(model_dir, "weights.pt"), map_location="cpu", weights_only=True)
        self.model = LSTMLanguageModel(ModelConfig(**saved["config"]))
        self.model.load_state_dict(saved["state_dict"])
        self.model.eval()
        cfg = self.model.config
        self.zero = torch.zeros(cfg.num_layers, cfg.hidden_size)
        logger.info("LSTM LM loaded: %s, %d torch threads", cfg, torch.get_num_threads())
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        assert self.model is not None
        seq_ids = [context.get_sequence_id(i) for i in range(len(data))]
        tokens = [int(row.get("data") or row["body"]) for row in data]
        hs, cs = zip(*(self.states.get(s, (self.zero, self.zero)) for s in seq_ids), strict=True)
        with torch.inference_mode():
            h0, c0 = torch.stack(hs, dim=1), torch.stack(cs, dim=1)  # (layers, batch, hidden)
            logits, (h1, c1) = self.model(torch.tensor(tokens).unsqueeze(1), (h0, c0))
            top_logprob, top_id = torch.log_softmax(logits[:, -1], dim=-1).max(dim=-1)
        for i, s in enumerate(seq_ids):
            self.states[s] = (h1[:, i].clone(), c1[:, i].clone())
            self.states.move_to_end(s)
        while len(self.states) > self.capacity:
            self.states.popitem(last=False)
        probs = top_logprob.exp().tolist()
        return [json.dumps({"id": i, "p": p}) for i, p in zip(top_id.tolist(), probs, strict=True)]
