"""Loading and validating model folders, and running one ONNX Runtime call.

Layout: ``<models_dir>/<name>/<version>/`` in the format of ``lstmd.model.folder``. For each
name the highest version is served. Any broken folder stops start-up with a message that
names it: a server that silently serves fewer models than asked is worse than one that fails.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from lstmd.model import graph
from lstmd.model.folder import ONNX_FILE, ModelCard, ModelFormatError, read_model_dir
from lstmd.model.tokenizer import Vocab, WordsTokenizer
from lstmd.server.errors import NotFound, echo
from lstmd.server.settings import Settings
from lstmd.server.words import WordTable

log = logging.getLogger(__name__)

NO_TOKEN = -1  # a session's last token before anything was fed to a model that starts from zeros


class ModelError(Exception):
    """A model cannot be served; the server refuses to start."""


class Model:
    """One served model: its card, tokenizer and ONNX Runtime session."""

    def __init__(self, folder: Path, settings: Settings):
        self.folder = folder
        self.card, self.tokenizer = read_model_dir(folder)
        self.name, self.version = self.card.name, self.card.version
        self.layers, self.hidden = self.card.num_layers, self.card.hidden_size
        try:
            self.session = graph.load(folder / ONNX_FILE, settings.intra_op_threads, spinning=False,
                                      optimization=settings.graph_optimization,
                                      providers=settings.providers.split(","))  # fmt: skip
        except ValueError as e:  # a provider this onnxruntime lacks
            raise ModelError(f"{e} (--providers {settings.providers})") from e
        graph.check(self.session, self.card)
        try:
            self.words = WordTable(self.tokenizer)
        except ValueError as e:
            raise ModelError(f"{folder}: its tokenizer's pieces cannot be read as words: {e}") from e
        # A new session starts after the tokenizer's initial token: for lstmd's word models "<eos>",
        # as if after the end of a paragraph; for library tokenizers their bos token if they have one.
        # With initial "zeros" it is the zero state itself, with no last token (NO_TOKEN).
        first = self.tokenizer.initial_id
        zero = self.zero_state(1)
        if first is None:
            self._initial = (zero[:, :, 0].copy(), zero[:, :, 0].copy(), NO_TOKEN)
        else:
            out = self.run(np.array([[first]], np.int64), zero[0], zero[1], 1)
            self._initial = (np.stack([out.h[:, 0], out.c[:, 0]]), zero[:, :, 0].copy(), first)

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019  (models live as long as the server)
    def text_after(self, last_token: int, token: int) -> str:
        """The text ``token`` adds after ``last_token`` (NO_TOKEN: none), as the tokenizer decodes it:
        every candidate of every prediction asks for one, so it is cached."""
        stream = self.tokenizer.text_stream([] if last_token == NO_TOKEN else [last_token])
        return stream.add(token, last=True)

    def initial_state(self) -> tuple[np.ndarray, np.ndarray, int]:
        """A new session's (state, state before its last token, last token); copies. A model that
        starts from zeros gives the zero state twice and NO_TOKEN."""
        state, prev_state, last_token = self._initial
        return state.copy(), prev_state.copy(), last_token

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def vocab(self) -> Vocab:
        """The ``Vocab`` of a model with lstmd's word tokenizer (the bundled model's kind)."""
        if not isinstance(self.tokenizer, WordsTokenizer):
            raise TypeError(f"{self.name} has a {self.tokenizer.kind} tokenizer, not lstmd's words: use .tokenizer")
        return self.tokenizer.vocab

    def zero_state(self, batch: int) -> np.ndarray:
        """Zero (h, c) for ``batch`` sequences: (2, layers, batch, hidden)."""
        return np.zeros((2, self.layers, batch, self.hidden), np.float32)

    def run(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, k: int, with_logprobs: bool = True
    ) -> graph.Outputs:
        """One ONNX Runtime call (``lstmd.model.graph.run``). Blocking."""
        return graph.run(self.session, tokens, h, c, k, with_logprobs)


class ModelRegistry:
    def __init__(self, models: dict[str, Model], default: str):
        self.models = models
        self.default = default

    def get(self, name: str) -> Model:
        model = self.models.get(name or self.default)
        if model is None:
            raise NotFound(f"no model named {echo(name)}; this server serves: {', '.join(sorted(self.models))}")
        return model

    def cards(self) -> list[tuple[ModelCard, bool]]:
        return [(m.card, name == self.default) for name, m in sorted(self.models.items())]


def _folders(path: Path) -> list[Path]:
    """The sub-folders of ``path`` that can be models or versions: hidden ones (``lstmd-export``
    stages a version in ``.<version>.partial-*`` beside its place) never are."""
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _version_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (-1, path.name)


def load_models(settings: Settings) -> ModelRegistry:
    """Load the newest version of every model under ``settings.models_dir``. Raises ModelError."""
    root = Path(settings.models_dir)
    if not root.is_dir():
        raise ModelError(f"models directory {root} does not exist")
    models: dict[str, Model] = {}
    for name_dir in sorted(_folders(root)):
        versions = sorted(_folders(name_dir), key=_version_key)
        if not versions and any(p.name.startswith(".") for p in name_dir.iterdir()):
            log.warning("%s holds only hidden folders (an export that never finished?): no model served from it",
                        name_dir)  # fmt: skip
            continue
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
