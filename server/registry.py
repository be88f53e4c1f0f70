"""Loading and validating model folders, and running one ONNX Runtime call.

Layout: ``<models_dir>/<name>/<version>/`` in the format of ``lstmd.model.folder``. For each
name the highest version is served, or the one the operator pins (``--model-versions``). Any broken
folder stops start-up with a message that names it: a server that silently serves fewer models than
asked is worse than one that fails. Later versions are loaded while the server runs
(server.versions); the registry holds every loaded version, and which one each name serves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lstmd.model import graph
from lstmd.model.folder import CARD_FILE, ONNX_FILE, ModelFormatError, read_model_dir
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
        # two versions with the same vocabulary give token ids the same meaning (client recovery checks it)
        self.vocabulary_sha256 = vocabulary_sha256(self.tokenizer.pieces)
        # every candidate of every prediction asks for one; cached per model, so an unloaded one is freed
        self.text_after = functools.lru_cache(maxsize=1 << 16)(self._text_after)
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

    def _text_after(self, last_token: int, token: int) -> str:
        """The text ``token`` adds after ``last_token`` (NO_TOKEN: none), as the tokenizer decodes it."""
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


def vocabulary_sha256(pieces: Sequence[str]) -> str:
    """SHA-256, hex, of a vocabulary's tokens in id order, as a JSON array in UTF-8 (ModelInfo.vocabulary_sha256)."""
    return hashlib.sha256(json.dumps(list(pieces), ensure_ascii=False).encode()).hexdigest()


class ModelRegistry:
    """The loaded model versions: per name the one new sessions go to (``models``), and the ones no
    longer served that are kept for their sessions (``draining``, each with its unload deadline).
    A Session holds its Model, so it stays on its version whatever the registry serves later."""

    def __init__(self, models: dict[str, Model], default: str, pins: dict[str, str] | None = None):
        self.models = models  # name: the served version
        self.default = default
        self.pins = pins or {}  # name: the version the operator chose (else the newest)
        self.draining: dict[Model, float | None] = {}  # a version no longer served: its deadline (Unix s; None: none)

    def get(self, name: str) -> Model:
        model = self.models.get(name or self.default)
        if model is None:
            raise NotFound(f"no model named {echo(name)}; this server serves: {', '.join(sorted(self.models))}")
        return model

    def find(self, name: str, version: str) -> Model | None:
        """The loaded ``version`` of ``name`` (served or draining), or None. On every Redis read: no sorting."""
        return next((m for m in (*self.models.values(), *self.draining) if (m.name, m.version) == (name, version)),
                    None)  # fmt: skip

    def loaded(self) -> list[Model]:
        """Every loaded version, by name, oldest version first."""
        return sorted([*self.models.values(), *self.draining], key=lambda m: (m.name, version_order(m.version)))

    def serve(self, model: Model, drain_s: float, now: float) -> Model | None:
        """Serve ``model`` for its name; the version served before drains (deadline ``drain_s`` from
        ``now``) and is returned, or None when it was ``model`` already."""
        old = self.models.get(model.name)
        self.draining.pop(model, None)
        self.models[model.name] = model
        if old is None or old is model:
            return None
        self.draining[old] = now + drain_s
        return old

    def unload(self, model: Model) -> None:
        """Forget a draining version (its sessions have ended)."""
        del self.draining[model]


def _folders(path: Path) -> list[Path]:
    """The sub-folders of ``path`` that can be models or versions: hidden ones (``lstmd-export``
    stages a version in ``.<version>.partial-*`` beside its place) never are."""
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def version_order(version: str) -> tuple[int, str]:
    """Sorts versions as the newest-wins rule sees them: numbers by value, after any other name;
    equal numbers ("01", "1") by name, so that every replica picks the same newest."""
    return (int(version), version) if version.isascii() and version.isdigit() else (-1, version)


def parse_pins(text: str) -> dict[str, str]:
    """``--model-versions``: 'name=version' pairs, comma separated (the settings checked the form)."""
    return dict(pair.split("=", 1) for pair in text.split(",") if pair)


def version_folders(root: Path, name: str) -> list[Path]:
    """The version folders of model ``name`` under ``root``, oldest first."""
    folder = root / name
    return sorted(_folders(folder), key=lambda p: version_order(p.name)) if folder.is_dir() else []


def choose(root: Path, pins: dict[str, str]) -> dict[str, Path]:
    """The version folder each model under ``root`` serves: its pin, or its newest. Raises ModelError."""
    chosen: dict[str, Path] = {}
    for name_dir in sorted(_folders(root)):
        versions = version_folders(root, name_dir.name)
        if not versions and any(p.name.startswith(".") for p in name_dir.iterdir()):
            log.warning("%s holds only hidden folders (an export that never finished?): no model served from it",
                        name_dir)  # fmt: skip
            continue
        if not versions:
            raise ModelError(f"{name_dir}: no version folders (expected {name_dir}/<version>/model.onnx)")
        pin = pins.get(name_dir.name)
        if pin and not (name_dir / pin).is_dir():
            raise ModelError(f"{name_dir.name} is pinned to version {pin!r}, and {name_dir / pin} does not exist "
                             f"(versions there: {', '.join(p.name for p in versions)})")  # fmt: skip
        chosen[name_dir.name] = name_dir / pin if pin else versions[-1]
    unknown = sorted(set(pins) - set(chosen))
    if unknown:
        raise ModelError(f"versions are pinned for {', '.join(unknown)}, which {root} holds no model of")
    return chosen


def load_model(folder: Path, settings: Settings) -> Model:
    """The model in ``folder`` (``<models_dir>/<name>/<version>``), checked. Blocking. Raises ModelError."""
    try:
        model = Model(folder, settings)
    except ModelFormatError as e:
        raise ModelError(f"cannot serve {folder}: {e}") from e
    if model.name != folder.parent.name:
        raise ModelError(f"{folder}: the card names the model {model.name!r}, its folder {folder.parent.name!r}")
    if model.version != folder.name:  # a version folder copied under a new name keeps its card's version
        raise ModelError(f"{folder}: the card ({CARD_FILE}) says version {model.version!r}, its folder "
                         f"{folder.name!r}; set the card's \"version\" to {folder.name!r} (lstmd-export --version "
                         "writes both)")  # fmt: skip
    log.info("loaded model %s version %s from %s (%d words, %d x %d)", model.name, model.version, folder,
             model.vocab_size, model.layers, model.hidden)  # fmt: skip
    return model


def load_models(settings: Settings) -> ModelRegistry:
    """Load the served version of every model under ``settings.models_dir``. Raises ModelError."""
    root = Path(settings.models_dir)
    if not root.is_dir():
        raise ModelError(f"models directory {root} does not exist")
    pins = parse_pins(settings.model_versions)
    models = {name: load_model(folder, settings) for name, folder in choose(root, pins).items()}
    if not models:
        raise ModelError(f"no models in {root} (expected {root}/<name>/<version>/model.onnx)")
    default = settings.default_model or sorted(models)[0]
    if default not in models:
        raise ModelError(f"--default-model {default!r} is not among the loaded models: {', '.join(sorted(models))}")
    return ModelRegistry(models, default, pins)
