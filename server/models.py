"""Loading and validating model folders, and running one ONNX Runtime call.

Layout: ``<models_dir>/<name>/<version>/`` in the format of ``export.model_format``. For each
name the highest version is served. Any broken folder stops start-up with a message that
names it: a server that silently serves fewer models than asked is worse than one that fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.model_format import ONNX_FILE, OUTPUTS, ModelCard, ModelFormatError, check_graph, read_model_dir
from server.errors import NotFound
from server.settings import Settings

log = logging.getLogger(__name__)

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ModelError(Exception):
    """A model cannot be served; the server refuses to start."""


@dataclass
class Outputs:
    logprobs: np.ndarray  # (batch, vocab)
    top_logprobs: np.ndarray  # (batch, k)
    top_ids: np.ndarray  # (batch, k)
    h: np.ndarray  # (layers, batch, hidden)
    c: np.ndarray  # (layers, batch, hidden)


class Model:
    """One served model: its card, vocabulary and ONNX Runtime session."""

    def __init__(self, folder: Path, settings: Settings):
        self.folder = folder
        self.card, self.vocab = read_model_dir(folder)
        self.name, self.version = self.card.name, self.card.version
        self.layers, self.hidden = self.card.num_layers, self.card.hidden_size
        self.session = _ort_session(folder / ONNX_FILE, settings)
        check_graph(_shapes(self.session.get_inputs()), _shapes(self.session.get_outputs()), self.card)
        # A new session starts as if after the end of a paragraph: the state after "<eos>".
        eos = self.vocab.eos_id
        zero = self.zero_state(1)
        out = self.run(np.array([[eos]], np.int64), zero[0], zero[1], 1)
        self._initial = (np.stack([out.h[:, 0], out.c[:, 0]]), zero[:, :, 0].copy(), eos)

    def initial_state(self) -> tuple[np.ndarray, np.ndarray, int]:
        """A new session's (state, state before its last token, last token); copies."""
        state, prev_state, last_token = self._initial
        return state.copy(), prev_state.copy(), last_token

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def zero_state(self, batch: int) -> np.ndarray:
        """Zero (h, c) for ``batch`` sequences: (2, layers, batch, hidden)."""
        return np.zeros((2, self.layers, batch, self.hidden), np.float32)

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, k: int, with_logprobs: bool = True) -> Outputs:
        """One ONNX Runtime call: ``tokens`` (batch, time), ``h``/``c`` (layers, batch, hidden). Blocking.

        Without ``with_logprobs`` the (batch, vocab) log-probabilities are not copied out (the graph
        still computes them for top-k); ``Outputs.logprobs`` is then empty."""
        feeds = {"tokens": tokens, "h0": h, "c0": c, "top_k": np.array(k, np.int64)}
        names = list(OUTPUTS if with_logprobs else OUTPUTS[1:])
        values = dict(zip(names, self.session.run(names, feeds), strict=True))
        logprobs = values.get("logprobs", np.empty((tokens.shape[0], 0), np.float32))
        return Outputs(logprobs, values["top_logprobs"], values["top_ids"], values["h1"], values["c1"])


def _shapes(args: list[ort.NodeArg]) -> dict[str, list[int | None]]:
    """Names to shapes, with None for dynamic dimensions."""
    return {a.name: [d if isinstance(d, int) else None for d in a.shape] for a in args}


def _ort_session(path: Path, settings: Settings) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads spin by default, burning a core the gRPC event loop needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = _OPTIMIZATION[settings.graph_optimization]
    wanted = [_PROVIDERS[p] for p in settings.providers.split(",")]
    missing = set(wanted) - set(ort.get_available_providers())
    if missing:
        raise ModelError(
            f"execution provider(s) {', '.join(sorted(missing))} asked for (--providers {settings.providers}) "
            f"but this onnxruntime has only {', '.join(ort.get_available_providers())}"
        )
    return ort.InferenceSession(str(path), options, providers=wanted)


class ModelRegistry:
    def __init__(self, models: dict[str, Model], default: str):
        self.models = models
        self.default = default

    def get(self, name: str) -> Model:
        model = self.models.get(name or self.default)
        if model is None:
            raise NotFound(f"no model named {name!r}; this server serves: {', '.join(sorted(self.models))}")
        return model

    def cards(self) -> list[tuple[ModelCard, bool]]:
        return [(m.card, name == self.default) for name, m in sorted(self.models.items())]


def _version_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (-1, path.name)


def load_models(settings: Settings) -> ModelRegistry:
    """Load the newest version of every model under ``settings.models_dir``. Raises ModelError."""
    root = Path(settings.models_dir)
    if not root.is_dir():
        raise ModelError(f"models directory {root} does not exist")
    models: dict[str, Model] = {}
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = sorted((p for p in name_dir.iterdir() if p.is_dir()), key=_version_key)
        if not versions:
            raise ModelError(f"{name_dir}: no version folders (expected {name_dir}/<version>/model.onnx)")
        try:
            model = Model(versions[-1], settings)
        except ModelFormatError as e:
            raise ModelError(f"cannot serve {versions[-1]}: {e}") from e
        if model.name != name_dir.name:
            raise ModelError(f"{versions[-1]}: the card names the model {model.name!r}, its folder {name_dir.name!r}")
        models[model.name] = model
        log.info("loaded model %s version %s from %s (%d words, %d x %d)", model.name, model.version,
                 versions[-1], model.vocab_size, model.layers, model.hidden)  # fmt: skip
    if not models:
        raise ModelError(f"no models in {root} (expected {root}/<name>/<version>/model.onnx)")
    default = settings.default_model or sorted(models)[0]
    if default not in models:
        raise ModelError(f"--default-model {default!r} is not among the loaded models: {', '.join(sorted(models))}")
    return ModelRegistry(models, default)
