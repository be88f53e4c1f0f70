"""Tokenizers of model folders, and lstmd's own word tokenizer and vocabulary.

A model folder's card names its tokenizer (``TokenizerSpec``); ``Tokenizer`` is what the server
asks of every kind: text to ids and pieces, ids back to text, the special ids, the vocabulary
size. The kinds over a ``vocab.txt`` live here: ``words`` (lstmd's word tokenizer, below),
``whitespace`` (already-tokenized text) and ``characters``. The kinds read with the libraries
made for them (Hugging Face ``tokenizers``, SentencePiece) live in
``lstmd.model.library_tokenizers``; ``lstmd.model.folder.load_tokenizer`` loads any kind.

Pure Python (no torch, no numpy, no tokenizer library) so the server and the client can import it.

The ``words`` kind's decisions (documented in README):

- Text is NFKC-normalised, curly quotes become straight ones, and everything is lowercased
  (unless the spec says ``keep_case``: then ``The`` and ``the`` are different words). Format
  characters (Unicode category Cf: zero-width spaces and joiners, the byte-order mark,
  bidirectional controls, soft hyphens, ...) are dropped first: invisible, they never become
  tokens (each was an ``<unk>``), and a word they are inside stays one word.
- A word is a run of letters, optionally joined by apostrophes or hyphens inside it
  ("don't", "twenty-one"). Numbers are kept as written ("1945", "3.5"): frequent ones earn a
  vocabulary entry, rare ones become ``<unk>``. Every other visible character is its own
  token, so punctuation is split off. Underscores (Gutenberg's _italics_) are dropped.
- A newline ends a line: it becomes ``<eos>``. Corpus loading first joins hard-wrapped lines
  of a paragraph, so in training ``<eos>`` marks paragraph and verse-line ends.

Why the ``words`` kind is hand-written rather than a ``tokenizers`` pipeline (measured by
``python -m bench.tokenizer_speed``, which builds one: format-character removal, NFKC, final-sigma,
quote and lowercase normalizers; ``Split`` pre-tokenizers with ``_TOKEN`` in Unicode properties; a
``WordLevel`` model over ``vocab.txt``). The pipeline gives the same ids, pieces and unknown flags on the whole bundled
corpus (174 documents, 1,854,709 tokens; the test split's 19 documents, 197,905 tokens), but:

- it is slower, also where the server uses it, one short feed at a time: 10-word feeds
  took 55-66 us a call against 9.5-14.5 us (4-7x the time), test-split documents 12-15x
  (1.9M tokens/s against 0.12-0.16M), on a shared 2-core machine; the library's encode call
  alone, before lstmd's pieces (the word for ``<unk>``, ``<eos>`` for a line end) are restored,
  takes 3-6x the time;
- it is not the same tokenizer outside the corpus: the library's NFKC and character tables are
  of other Unicode versions than Python's (it leaves U+1FBF1, a segmented 1, and ㋿ and ꟲ as
  they are where Python gives 1, 令和 and c; it classes characters unassigned in Python's Unicode
  as letters), and its
  ``Lowercase`` knows no final ``ς`` (a regex normalizer puts it back, in the common case only);
- the client imports ``detokenize`` from here, and would then need the library, or a split module.
"""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

UNK = "<unk>"
EOS = "<eos>"

_TOKEN = re.compile(
    r"[^\W\d_]+(?:['\-][^\W\d_]+)*"  # words, with inner apostrophes or hyphens
    r"|\d+(?:[.,]\d+)*"  # numbers: 1945, 3.5, 1,000
    r"|[^\w\s]"  # any other visible character: punctuation
)
# Format characters (category Cf) in Python's Unicode (unicodedata), written out: built from
# unicodedata at import it would cost every client a scan of all code points. A test checks it
# against unicodedata, so a Python with a newer Unicode says what to add.
_FORMAT = re.compile(
    r"[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    r"\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
    r"\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
_QUOTES = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "_": " "}  # str.replace: 100x translate's speed
_PIECE = 1024  # characters normalised at a time while measuring an expansion: 18,432 at most after NFKC
_LONG_LINE = 4096  # characters: a longer line is matched a token at a time (see tokenize)
_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "'"}
_NO_SPACE_AFTER = {"(", "[", "{", "$"}


class TextTooLong(ValueError):
    """Text longer than ``limit`` characters once normalised, found before the work of tokenizing
    it. ``length`` is its normalised length, or with ``at_least`` less than that: the text was
    refused part way through normalising it."""

    def __init__(self, length: int, limit: int, at_least: bool = False):
        self.length, self.limit, self.at_least = length, limit, at_least
        super().__init__(f"{'more than ' if at_least else ''}{length} characters once normalised, the limit is {limit}")


def normalize(text: str, lowercase: bool = True, max_chars: int | None = None) -> str:
    """The ``words`` kind's normalisation (module docstring). With ``max_chars``, a result longer
    than that raises TextTooLong; of a text that NFKC expands (U+FDFA becomes 18 characters, so
    100,000 of them 1.8 million), no more than about ``max_chars`` characters are spelt out first."""
    if not text.isascii():  # ASCII has no format characters and is NFKC already
        text = _FORMAT.sub("", text)
        if max_chars is not None and not unicodedata.is_normalized("NFKC", text):
            _refuse_expansion(text, max_chars)
        text = unicodedata.normalize("NFKC", text)
    for old, new in _QUOTES.items():
        text = text.replace(old, new)
    if lowercase:
        text = text.lower()
    if max_chars is not None and len(text) > max_chars:
        raise TextTooLong(len(text), max_chars)
    return text


def _refuse_expansion(text: str, max_chars: int) -> None:
    """Raises TextTooLong as soon as NFKC of ``text``, normalised a piece at a time, is surely longer
    than ``max_chars``. Normalised whole, an accent starting a piece could join the letter ending the
    one before: a character absorbs at most 3 (the longest canonical decomposition is 4 code
    points), so the whole is longer than the pieces' sum less 4 a cut."""
    total = 0
    for cuts, start in enumerate(range(0, len(text), _PIECE)):
        total += len(unicodedata.normalize("NFKC", text[start : start + _PIECE]))
        if total - 4 * cuts > max_chars:
            raise TextTooLong(max_chars, max_chars, at_least=True)


def tokenize(text: str, lowercase: bool = True, max_chars: int | None = None) -> list[str]:
    """Split text into word tokens; each line end becomes ``<eos>``. ``max_chars``: see normalize."""
    lines = normalize(text, lowercase, max_chars).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    words: list[str] = []
    for i, line in enumerate(lines):
        if len(line) > _LONG_LINE:  # one C call for the whole line would hold the GIL for up to 30 ms
            words.extend(match.group() for match in _TOKEN.finditer(line))
        else:
            words.extend(_TOKEN.findall(line))
        if i < len(lines) - 1:
            words.append(EOS)
    return words


def detokenize(words: Iterable[str]) -> str:
    """Join tokens into readable text: no space before closing punctuation."""
    joiner = Detokenizer()
    return "".join(map(joiner.add, words))


class Detokenizer:
    """``detokenize`` one token at a time: ``add`` returns the text a token adds after the ones
    before it. All it remembers is whether the next token hugs the text and whether a quote is open."""

    def __init__(self) -> None:
        self.quote_open = False
        self.glue_next = True  # no space before the first word or after an opening bracket

    def add(self, word: str) -> str:
        if word == EOS:
            self.glue_next = True
            return "\n"
        glue = self.glue_next or word in _NO_SPACE_BEFORE
        if word == '"':
            glue = self.glue_next or self.quote_open  # a closing quote hugs the word before it
            self.quote_open = not self.quote_open
            self.glue_next = self.quote_open  # an opening quote hugs the word after it
        else:
            self.glue_next = word in _NO_SPACE_AFTER
        return word if glue else " " + word


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
        return cls(read_vocab_lines(Path(path)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.words) + "\n", encoding="utf-8")

    def encode(self, words: Iterable[str]) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def encode_text(self, text: str) -> list[int]:
        return self.encode(tokenize(text))


# The tokenizer of a model folder

KINDS = ("words", "whitespace", "characters", "hf", "sentencepiece")
DEFAULT_FILES = {"words": "vocab.txt", "whitespace": "vocab.txt", "characters": "vocab.txt",
                 "hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}  # fmt: skip
INITIAL = ("eos", "bos", "zeros")  # "zeros": a new session is the zero state, with no token before its first


@dataclass(frozen=True)
class TokenizerSpec:
    """The card's ``tokenizer`` section: which tokenizer the model was trained with.

    A card without one (folders written before tokenizers were recorded) means ``words``."""

    kind: str = "words"  # one of KINDS
    file: str = ""  # in the model folder; "": DEFAULT_FILES[kind]
    lowercase: bool = False  # fold text to lower case first (``words`` always does, unless keep_case)
    unk: str | None = None  # names of the special tokens; None: the kind's default (see the classes)
    eos: str | None = None  # end of line / sentence
    bos: str | None = None  # beginning of sequence
    newline: str | None = None  # the token a newline becomes; "": none (a space); None: the kind's default
    initial: str | None = None  # a session starts after this token, "eos" or "bos", or "zeros"; None: kind's default
    keep_case: bool = False  # the words kind only: do not lowercase (last: the fields before are positional)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.initial is not None and self.initial not in INITIAL:
            raise ValueError(f"tokenizer initial {self.initial!r} is not one of {', '.join(INITIAL)}")
        if self.kind == "words" and (self.lowercase or {self.unk, self.eos, self.bos, self.newline} != {None}):
            raise ValueError(
                "the words tokenizer takes no options but keep_case: it is lstmd's own, with <unk> and <eos>"
            )
        if self.keep_case and self.kind != "words":
            raise ValueError("keep_case is the words tokenizer's option: the other kinds keep case unless lowercase")

    @property
    def path(self) -> str:
        return self.file or DEFAULT_FILES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """The card's section: the kind, the file, and only the options that were set."""
        data = {k: v for k, v in asdict(self).items() if v not in (None, False, "") or (k == "newline" and v == "")}
        return {"kind": self.kind, "file": self.path, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerSpec:
        """Raises ValueError for an unknown key, kind or option value."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown tokenizer option(s) {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(slots=True)
class Encoding:
    """Text as a model's tokens: ids, the pieces they spell, and which are unknown (``unk_id``
    standing for text the vocabulary lacks)."""

    ids: list[int]
    pieces: list[str]
    unknown: list[bool]


class Tokenizer(ABC):
    """A model's tokenizer, whatever its kind: what the server and export ask of it.

    ``pieces[i]`` is token ``i`` as the vocabulary spells it (a word, a character, or a subword
    piece such as ``▁the`` or ``Ġthe``), listed once at load so turning ids into pieces costs no
    library call. Special ids are None where the model has no such token."""

    kind: ClassVar[str]

    def __init__(self, spec: TokenizerSpec, pieces: list[str], unk: int | None, eos: int | None, bos: int | None):
        self.spec = spec
        self.pieces = pieces
        self.unk_id, self.eos_id, self.bos_id = unk, eos, bos
        initial = spec.initial or ("bos" if bos is not None and self.kind in ("hf", "sentencepiece") else "eos")
        initial_id = None if initial == "zeros" else bos if initial == "bos" else eos
        if initial_id is None and initial != "zeros":
            raise ValueError(f"a new session starts after the {initial} token, and this tokenizer has none: "
                             f"name it ({initial}) or start after the other one (initial)")  # fmt: skip
        # a new session starts after this token; None: from the zero state, with no token before its
        # first (as pytorch/examples' word_language_model trains and evaluates), so the first token
        # fed has no prediction
        self.initial_id: int | None = initial_id
        newline = spec.newline
        if newline is None and self.kind in ("words", "whitespace", "characters"):
            newline = pieces[eos] if eos is not None else ""
        self.newline_id = None if not newline else self._special(newline, "newline")

    def __len__(self) -> int:
        return len(self.pieces)

    @property
    def special_ids(self) -> frozenset[int]:
        """The tokens that are no text to suggest: unknown, end, beginning and newline tokens, and
        those the tokenizer's library marks special or control."""
        named = {self.unk_id, self.eos_id, self.bos_id, self.newline_id}
        return frozenset(i for i in named | set(self._library_special_ids()) if i is not None)

    def _library_special_ids(self) -> Sequence[int]:
        return ()

    @abstractmethod
    def token_id(self, piece: str) -> int | None:
        """The id of a token by name, or None if the vocabulary lacks it."""

    @abstractmethod
    def _encode_line(self, text: str) -> Encoding:
        """Text without newlines (or with them, when the spec leaves newlines to the library)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, as the tokenizer writes it."""

    def encode(self, text: str, max_chars: int | None = None) -> Encoding:
        """Text to tokens. With a newline token (or "" for none), each line is encoded on its own and
        lines are joined by that token; without one, newlines are left to the tokenizer.

        With ``max_chars``, text longer than that once normalised raises TextTooLong before it is
        tokenized: the ``words`` kind measures its own normalisation (``normalize``), the others the
        text as lowercased by the spec (the libraries normalise inside their encode calls)."""
        if self.spec.lowercase:
            text = text.lower()
        if max_chars is not None and len(text) > max_chars:
            raise TextTooLong(len(text), max_chars)
        if self.newline_id is None and self.spec.newline is None and self.kind in ("hf", "sentencepiece"):
            return self._encode_line(text)
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        out = Encoding([], [], [])
        for i, line in enumerate(lines):
            if i and self.newline_id is not None:
                out.ids.append(self.newline_id)
                out.pieces.append(self.pieces[self.newline_id])
                out.unknown.append(False)
            if line:
                encoded = self._encode_line(line)
                out.ids += encoded.ids
                out.pieces += encoded.pieces
                out.unknown += encoded.unknown
        return out

    def encode_text(self, text: str) -> list[int]:
        return self.encode(text).ids

    def text_stream(self, context: Sequence[int]) -> TextStream:
        """Decodes ids one at a time after ``context`` (the ids before them): ``add(id)`` returns the
        text the id adds, so that the texts together are decode(context + ids) minus decode(context)."""
        return TextStream(self.decode, context)

    def _decode_lines(self, ids: Sequence[int], decode: Callable[[list[int]], str]) -> str:
        """``decode`` each run of ids between newline tokens, joined by newlines."""
        lines: list[list[int]] = [[]]
        for i in ids:
            if i == self.newline_id:
                lines.append([])
            else:
                lines[-1].append(i)
        return "\n".join(decode(line) for line in lines)

    def stop_key(self, word: str, max_chars: int | None = None) -> str:
        """How a stop word given by a caller compares with generated pieces; ``max_chars`` as for encode."""
        key = word.strip().lower() if self.spec.lowercase else word.strip()
        if max_chars is not None and len(key) > max_chars:
            raise TextTooLong(len(key), max_chars)
        return key

    def _special(self, name: str, role: str) -> int:
        found = self.token_id(name)
        if found is None:
            raise ValueError(f"the {role} token {name!r} is not in the tokenizer's vocabulary")
        return found

    def _optional(self, name: str | None, default: str, role: str) -> int | None:
        """A special token's id: the named one (which must exist), else ``default`` if present."""
        return self._special(name, role) if name is not None else self.token_id(default)


def read_vocab_lines(path: Path) -> list[str]:
    """``vocab.txt``: one token per line, the line number being the id; raises ValueError for duplicates."""
    words = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
    if len(set(words)) != len(words):
        raise ValueError("vocabulary has duplicate words")
    return words


class WordsTokenizer(Tokenizer):
    """lstmd's word tokenizer (``tokenize`` / ``detokenize``) over a ``Vocab``: ``<unk>`` and
    ``<eos>``, a newline becomes ``<eos>`` and sessions start after it. Exactly what lstmd
    served before tokenizers were recorded in the card."""

    kind = "words"

    def __init__(self, spec: TokenizerSpec, vocab: Vocab):
        self.vocab = vocab
        super().__init__(spec, vocab.words, vocab.unk_id, vocab.eos_id, None)

    def token_id(self, piece: str) -> int | None:
        return self.vocab.ids.get(piece)

    def text_stream(self, context: Sequence[int]) -> TextStream:
        """Exact and O(1) a token: ``detokenize`` is a left-to-right join (``Detokenizer``), so the
        whole context is read once and no window can lose an open quote."""
        return _WordsTextStream(self.pieces, context)

    def encode(self, text: str, max_chars: int | None = None) -> Encoding:
        words = tokenize(text, not self.spec.keep_case, max_chars)
        ids = self.vocab.encode(words)
        unk = self.vocab.unk_id
        return Encoding(ids, words, [i == unk and w != UNK for i, w in zip(ids, words, strict=True)])

    def _encode_line(self, text: str) -> Encoding:
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return detokenize(self.pieces[i] for i in ids)

    def stop_key(self, word: str, max_chars: int | None = None) -> str:
        return normalize(word, not self.spec.keep_case, max_chars).strip()


class _VocabFileTokenizer(Tokenizer):
    """A kind over ``vocab.txt`` that splits text itself: unknown text becomes the unknown token,
    ``<unk>`` unless the spec names another, which the vocabulary must hold."""

    def __init__(self, spec: TokenizerSpec, words: list[str]):
        self.ids = {w: i for i, w in enumerate(words)}
        self.pieces = words
        self._unk = self._special(spec.unk or UNK, "unknown")
        eos, bos = self._optional(spec.eos, EOS, "eos"), self._optional(spec.bos, "<bos>", "bos")
        super().__init__(spec, words, self._unk, eos, bos)

    def token_id(self, piece: str) -> int | None:
        return self.ids.get(piece)

    def _lookup(self, pieces: list[str]) -> Encoding:
        unk = self._unk
        ids = [self.ids.get(p, unk) for p in pieces]
        return Encoding(ids, pieces, [i == unk and p != self.pieces[i] for i, p in zip(ids, pieces, strict=True)])


class WhitespaceTokenizer(_VocabFileTokenizer):
    """Already-tokenized text (WikiText's ``The``, ``@-@``, ``'s``): tokens are separated by
    whitespace and kept as written (case included, unless ``lowercase``). A newline becomes the
    eos token (``<eos>`` if the vocabulary has one) unless the spec says otherwise."""

    kind = "whitespace"

    def _encode_line(self, text: str) -> Encoding:
        return self._lookup(text.split())

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        for i in ids:
            if i == self.newline_id:
                out.append("\n")
            else:
                out.append(self.pieces[i] if not out or out[-1] == "\n" else " " + self.pieces[i])
        return "".join(out)


class CharactersTokenizer(_VocabFileTokenizer):
    """One token per character (spaces included); characters the vocabulary lacks become the
    unknown token. A newline becomes the eos token, as ``vocab.txt`` cannot hold one."""

    kind = "characters"

    def _encode_line(self, text: str) -> Encoding:
        return self._lookup(list(text))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("\n" if i == self.newline_id else self.pieces[i] for i in ids)


class TextStream:
    """The text each id adds when ids come one at a time (generation): decode(ids so far) minus
    decode(the ids before), the usual streaming detokenization, computed over a window.

    Decoding every id so far at each step costs O(n) a token, O(n²) a generation. The window holds
    the last ``CONTEXT`` ids whose text was given, for the spacing and joining they decide (a
    SentencePiece ``▁``, a byte-level BPE ``Ġ`` after the word before), and the ids not yet given:
    an id whose decoding ends in U+FFFD (the first bytes of a character that the next token
    completes) or rewrites the window's text gives "" and comes out with a later one; ``last=True``
    gives everything held. So a token costs two decodes of a handful of ids. A tokenizer whose text
    depends on more than ``CONTEXT`` ids before overrides ``Tokenizer.text_stream``."""

    CONTEXT = 4  # ids of decoded text kept before the new ones
    MAX_HELD = 16  # ids held back at most (a model emitting bytes that never form a character)

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int]):
        self._decode = decode
        self._ids = list(context[-self.CONTEXT :])
        self._given = len(self._ids)  # ids[:given] are decoded text already given (or context)
        self._text = decode(self._ids)

    def add(self, token_id: int, last: bool = False) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        complete = text.startswith(self._text) and not text.endswith("\ufffd")
        if not (complete or last or len(self._ids) - self._given >= self.MAX_HELD):
            return ""
        start = len(self._text) if text.startswith(self._text) else _common_prefix(text, self._text)
        if len(self._ids) > self.CONTEXT:
            self._ids = self._ids[-self.CONTEXT :]
            self._text = self._decode(self._ids)
        else:
            self._text = text
        self._given = len(self._ids)
        return text[start:]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _WordsTextStream(TextStream):
    def __init__(self, pieces: list[str], context: Sequence[int]):
        self._pieces = pieces
        self._joiner = Detokenizer()
        for i in context:
            self._joiner.add(pieces[i])

    def add(self, token_id: int, last: bool = False) -> str:
        return self._joiner.add(self._pieces[token_id])
