"""The model folder format: what ``lstmd-export onnx`` writes and ``lstmd-server`` loads.

One folder per model version, ``<models_dir>/<name>/<version>/``, holding:

- ``model.onnx``: the graph, with the inputs and outputs of ``lstmd.model.graph``.
- ``vocab.txt``: one word per line, the line number being the token id.
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

from lstmd.model.tokenizer import Vocab

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
            f"{self.vocab_size} words, {self.precision}; {self.state_bytes} bytes of state per session.",
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


def read_model_dir(folder: str | Path) -> tuple[ModelCard, Vocab]:
    """Check a model folder's files, card, checksum and vocabulary. Raises ModelFormatError."""
    folder = Path(folder)
    for name in (ONNX_FILE, VOCAB_FILE, CARD_FILE):
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
    try:
        vocab = Vocab.load(folder / VOCAB_FILE)
    except ValueError as e:
        raise ModelFormatError(f"{folder}/{VOCAB_FILE}: {e}") from e
    if len(vocab) != card.vocab_size:
        raise ModelFormatError(f"{folder}: {VOCAB_FILE} has {len(vocab)} words, the card says {card.vocab_size}")
    return card, vocab
