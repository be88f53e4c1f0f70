"""The model folder format: what ``lstmd-export onnx`` writes and ``lstmd-server`` loads.

One folder per model version, ``<models_dir>/<name>/<version>/``, holding:

- ``model.onnx``: the graph, with the inputs and outputs of ``lstmd.model.graph``.
- the tokenizer's file, named in the card's ``tokenizer`` section (``TokenizerSpec``):
  ``vocab.txt`` (one token per line, the line number being the id) for the ``words``,
  ``whitespace`` and ``characters`` kinds, a ``tokenizer.json`` or a SentencePiece ``.model``.
  A card without the section (written before it existed) means ``words`` over ``vocab.txt``.
- ``model.json``: the model card (see ``ModelCard``), with the SHA-256 of ``model.onnx``.
- ``MODEL_CARD.md``: the same card for people.

Pure Python (no torch, no numpy): server, export and tests all read folders through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lstmd.model.tokenizer import (
    CharactersTokenizer,
    Tokenizer,
    TokenizerSpec,
    Vocab,
    WhitespaceTokenizer,
    WordsTokenizer,
    read_vocab_lines,
)

FORMAT_VERSION = 1
ONNX_FILE, VOCAB_FILE, CARD_FILE, CARD_TEXT_FILE = "model.onnx", "vocab.txt", "model.json", "MODEL_CARD.md"


class ModelFormatError(Exception):
    """A model folder does not match the format; the message says what is wrong."""


@dataclass
class ModelCard:
    name: str
    version: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    sha256: str
    precision: str = "fp32"  # or "int8"
    architecture: str = ""
    format_version: int = FORMAT_VERSION
    perplexity: dict[str, float] = field(default_factory=dict)  # valid, test, and the baseline's
    training: dict[str, Any] = field(default_factory=dict)  # corpus, split, time, machine, settings
    quantization: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # TokenizerSpec.to_dict(); {}: words

    @property
    def tokenizer_spec(self) -> TokenizerSpec:
        """Raises ModelFormatError for a section that is not a valid spec."""
        try:
            return TokenizerSpec.from_dict(self.tokenizer)
        except (ValueError, TypeError) as e:
            raise ModelFormatError(f"{CARD_FILE}: tokenizer: {e}") from e

    @property
    def state_bytes(self) -> int:
        """Bytes of (h, c) per session: two float32 arrays of (layers, hidden)."""
        return 2 * self.num_layers * self.hidden_size * 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def to_markdown(self) -> str:
        ppl = self.perplexity
        lines = [
            f"# Model card: {self.name} version {self.version}",
            "",
            f"{self.architecture or 'LSTM language model'}: {self.num_layers} layers of {self.hidden_size} units, "
            f"{self.vocab_size} tokens, {self.precision}; {self.state_bytes} bytes of state per session.",
            "",
            f"Tokenizer: `{json.dumps(self.tokenizer or {'kind': 'words', 'file': VOCAB_FILE})}`.",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        lines += [f"| {k.replace('_', ' ')} perplexity | {v:.1f} |" for k, v in ppl.items()]
        if "test" in ppl and "baseline_test" in ppl:
            lines.append(f"| test perplexity / baseline | {ppl['test'] / ppl['baseline_test']:.3f} |")
        for section in ("training", "quantization", "verification"):
            values = getattr(self, section)
            if values:
                lines += ["", f"## {section.capitalize()}", "", "```json", json.dumps(values, indent=1), "```"]
        lines += ["", f"`model.onnx` SHA-256: `{self.sha256}`", ""]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        missing = {"name", "version", "vocab_size", "num_layers", "hidden_size", "sha256"} - set(data)
        if missing:
            raise ModelFormatError(f"{CARD_FILE} lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in known})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_card(folder: Path, card: ModelCard) -> None:
    (folder / CARD_FILE).write_text(card.to_json())
    (folder / CARD_TEXT_FILE).write_text(card.to_markdown())


def read_model_dir(folder: str | Path) -> tuple[ModelCard, Tokenizer]:
    """Check a model folder's files, card, checksum and tokenizer. Raises ModelFormatError."""
    folder = Path(folder)
    for name in (ONNX_FILE, CARD_FILE):
        if not (folder / name).is_file():
            raise ModelFormatError(f"{folder}: missing {name}")
    try:
        card = ModelCard.from_json((folder / CARD_FILE).read_text())
    except (json.JSONDecodeError, TypeError) as e:
        raise ModelFormatError(f"{folder}/{CARD_FILE} is not a valid model card: {e}") from e
    if card.format_version != FORMAT_VERSION:
        raise ModelFormatError(f"{folder}: format version {card.format_version}, this lstmd reads {FORMAT_VERSION}")
    actual = sha256_file(folder / ONNX_FILE)
    if actual != card.sha256:
        raise ModelFormatError(
            f"{folder}/{ONNX_FILE}: checksum {actual[:12]}… does not match the card's {card.sha256[:12]}…"
        )
    return card, load_tokenizer(folder, card)


def load_tokenizer(folder: str | Path, card: ModelCard) -> Tokenizer:
    """The tokenizer the card names, from its file in ``folder``, checked against the card's
    vocabulary size (``lstmd.model.graph.check`` checks the graph's). Raises ModelFormatError."""
    tokenizer = open_tokenizer(folder, card.tokenizer_spec)
    if len(tokenizer) != card.vocab_size:
        raise ModelFormatError(
            f"{folder}: {card.tokenizer_spec.path} has {len(tokenizer)} tokens, the card says {card.vocab_size} "
            "(vocab_size)"
        )
    return tokenizer


def open_tokenizer(folder: str | Path, spec: TokenizerSpec) -> Tokenizer:
    """The tokenizer ``spec`` describes, from its file in ``folder``. Raises ModelFormatError."""
    folder = Path(folder)
    path = folder / spec.path
    if not path.is_file():
        raise ModelFormatError(f"{folder}: missing {spec.path} (the {spec.kind} tokenizer's file)")
    tokenizer: Tokenizer
    try:
        if spec.kind == "words":
            tokenizer = WordsTokenizer(spec, Vocab.load(path))
        elif spec.kind == "whitespace":
            tokenizer = WhitespaceTokenizer(spec, read_vocab_lines(path))
        elif spec.kind == "characters":
            tokenizer = CharactersTokenizer(spec, read_vocab_lines(path))
        else:
            from lstmd.model import library_tokenizers

            kind = {
                "hf": library_tokenizers.HuggingFaceTokenizer,
                "sentencepiece": library_tokenizers.SentencePieceTokenizer,
            }
            tokenizer = kind[spec.kind](spec, path)
    except ModuleNotFoundError as e:
        raise ModelFormatError(
            f"{folder}: the {spec.kind} tokenizer needs the {e.name} library: pip install {e.name}"
        ) from e
    except Exception as e:  # the libraries raise their own types (tokenizers: Exception) for a bad file
        raise ModelFormatError(f"{folder}/{spec.path}: not a valid {spec.kind} tokenizer: {e}") from e
    return tokenizer
