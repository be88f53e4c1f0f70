"""Word-level tokenizer and vocabulary, shared by training, export and the server.

Pure Python (no torch, no numpy) so the server can import it.

Decisions (documented in README):
- Text is NFKC-normalised, curly quotes become straight ones, and everything is lowercased.
- A word is a run of letters, optionally joined by apostrophes or hyphens inside it
  ("don't", "twenty-one"). Numbers are kept as written ("1945", "3.5"): frequent ones earn a
  vocabulary entry, rare ones become ``<unk>``. Every other visible character is its own
  token, so punctuation is split off. Underscores (Gutenberg's _italics_) are dropped.
- A newline ends a line: it becomes ``<eos>``. Corpus loading first joins hard-wrapped lines
  of a paragraph, so in training ``<eos>`` marks paragraph and verse-line ends.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

UNK = "<unk>"
EOS = "<eos>"

_TOKEN = re.compile(
    r"[^\W\d_]+(?:['\-][^\W\d_]+)*"  # words, with inner apostrophes or hyphens
    r"|\d+(?:[.,]\d+)*"  # numbers: 1945, 3.5, 1,000
    r"|[^\w\s]"  # any other visible character: punctuation
)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "_": " "})
_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "'"}
_NO_SPACE_AFTER = {"(", "[", "{", "$"}


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()


def tokenize(text: str) -> list[str]:
    """Split text into word tokens; each line end becomes ``<eos>``."""
    lines = normalize(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    words: list[str] = []
    for i, line in enumerate(lines):
        words.extend(_TOKEN.findall(line))
        if i < len(lines) - 1:
            words.append(EOS)
    return words


def detokenize(words: Iterable[str]) -> str:
    """Join tokens into readable text: no space before closing punctuation."""
    out: list[str] = []
    quote_open = False
    glue_next = True  # no space before the first word or after an opening bracket
    for word in words:
        if word == EOS:
            out.append("\n")
            glue_next = True
            continue
        glue = glue_next or word in _NO_SPACE_BEFORE
        if word == '"':
            glue = glue_next or quote_open  # a closing quote hugs the word before it
            quote_open = not quote_open
            glue_next = quote_open  # an opening quote hugs the word after it
        else:
            glue_next = word in _NO_SPACE_AFTER
        out.append(word if glue else " " + word)
    return "".join(out)


class Vocab:
    """Maps words to ids. ``<unk>`` and ``<eos>`` must be present.

    Saved as UTF-8 text, one word per line, the line number being the id.
    """

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            raise ValueError("vocabulary has duplicate words")
        for special in (UNK, EOS):
            if special not in self.ids:
                raise ValueError(f"vocabulary lacks the special token {special!r}")
        self.unk_id = self.ids[UNK]
        self.eos_id = self.ids[EOS]

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, words: Iterable[str], max_size: int, min_count: int = 1) -> Vocab:
        """Most frequent words first (ties alphabetically, so the result is deterministic)."""
        counts = Counter(w for w in words if w not in (UNK, EOS))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = [w for w, n in ranked if n >= min_count][: max_size - 2]
        return cls([UNK, EOS, *kept])

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        text = Path(path).read_text(encoding="utf-8")
        return cls([line for line in text.split("\n") if line])

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.words) + "\n", encoding="utf-8")

    def encode(self, words: Iterable[str]) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def encode_text(self, text: str) -> list[int]:
        return self.encode(tokenize(text))
