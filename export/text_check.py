"""Check the text path: does the model folder's tokenizer turn the user's own text into the ids
the model was trained on?

A model exported with the wrong tokenizer options (lstmd's lowercasing ``words`` over a cased
WikiText vocabulary, say) passes every numeric check, yet serves text as ids the model never
saw. Three figures catch it, through the folder's own tokenizer:

- unknown: the sample's tokens that became the unknown id, where the sample's piece is not
  literally the unknown token (``Encoding.unknown``), out of every token the sample becomes
  (line-end tokens included);
- unreachable: vocabulary entries no text can produce through this tokenizer (see
  ``unreachable_entries``), out of the vocabulary's size;
- ids: when the user gives the ids their own pipeline made for the same text, the share of
  lines the tokenizer reproduces exactly, and the first difference, as pieces.

``TextCheck.warnings`` says which figures pass their thresholds; ``lstmd-export`` prints them,
or with ``--strict-text`` refuses the export (``TextCheckError``).

Pure Python over ``lstmd.model.tokenizer.Tokenizer`` (no torch), like the folder layer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lstmd.export.errors import ExportError
from lstmd.model.library_tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer
from lstmd.model.tokenizer import Tokenizer

EXAMPLES = 5  # examples kept of each finding
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte-fallback pieces (SentencePiece, BPE with byte_fallback)
ADVICE = "is --tokenizer/--lowercase right?"


class TextCheckError(ExportError):
    """The text check failed with ``--strict-text``; the message names the figures."""


def _skipped(tokenizer: Tokenizer) -> set[int]:
    """Entries not tested: the special tokens (unknown, eos, bos, newline; a library's own special
    and control tokens) and byte-fallback pieces, which text reaches only through other rules."""
    skipped = {i for i in (tokenizer.unk_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.newline_id) if i is not None}
    if isinstance(tokenizer, HuggingFaceTokenizer):
        skipped |= {i for i, added in tokenizer.library.get_added_tokens_decoder().items() if added.special}
    elif isinstance(tokenizer, SentencePieceTokenizer):
        spm = tokenizer.library
        skipped |= {i for i in range(len(tokenizer)) if spm.is_control(i) or spm.is_unknown(i) or spm.is_byte(i)}
    if tokenizer.kind in ("hf", "sentencepiece"):
        skipped |= {i for i, piece in enumerate(tokenizer.pieces) if _BYTE_PIECE.fullmatch(piece)}
    return skipped


def unreachable_entries(tokenizer: Tokenizer) -> list[int]:
    """Vocabulary entries that no text can produce through ``tokenizer``, special tokens and
    byte-fallback pieces left out.

    Each entry is tested by encoding its own text and checking that it comes back as that single
    id. For the vocabulary kinds the text is the entry as written: an entry counts when the
    tokenizer would never emit it, such as an uppercase entry under ``words`` or ``lowercase``,
    one holding a space under ``whitespace``, one of several characters under ``characters``.

    For ``hf`` and ``sentencepiece`` the text is the entry decoded alone, and an entry counts only
    when the library by itself produces it from that text (as the single id, or among others: a
    SentencePiece ``T`` comes back as ``▁``, ``T``) but the folder's tokenizer, with its
    ``lowercase`` and newline options, does not produce it at all. A subword piece that continues
    a word (``ing`` after ``▁walk``) may not come back from its own text even from the library,
    yet text reaches it inside words: the library's own dependence on context is not counted,
    what the folder's options cut off is.
    """
    skipped = _skipped(tokenizer)
    library = tokenizer.kind in ("hf", "sentencepiece")
    unreachable = []
    for i, piece in enumerate(tokenizer.pieces):
        if i in skipped:
            continue
        if not library:
            if tokenizer.encode(piece).ids != [i]:
                unreachable.append(i)
            continue
        text = tokenizer.decode([i])
        if i in tokenizer._encode_line(text).ids and i not in tokenizer.encode(text).ids:
            unreachable.append(i)  # the library alone reaches it, the folder's options do not
    return unreachable


@dataclass
class IdsCheck:
    """The user's ids for the sample against the tokenizer's, line by line (or as one sequence)."""

    source: str
    lines: int
    reproduced: int
    first_difference: str = ""  # "" when every line is reproduced

    @property
    def share(self) -> float:
        return self.reproduced / self.lines if self.lines else 1.0


def read_ids(text: str, source: str) -> list[list[int]]:
    """Whitespace-separated ints, one line per line. Raises TextCheckError for anything else."""
    lines = text.splitlines()
    try:
        return [[int(t) for t in line.split()] for line in lines]
    except ValueError as e:
        raise TextCheckError(f"{source}: not whitespace-separated integer ids: {e}") from e


def _piece(tokenizer: Tokenizer, i: int) -> str:
    return repr(tokenizer.pieces[i]) if 0 <= i < len(tokenizer) else f"<id {i}: not in the vocabulary>"


def _difference(tokenizer: Tokenizer, where: str, ours: list[int], theirs: list[int]) -> str:
    at = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))

    def show(ids: list[int]) -> str:
        shown = " ".join(f"{_piece(tokenizer, i)}={i}" for i in ids[at : at + 4])
        return (shown or "(end)") + (" …" if len(ids) > at + 4 else "")

    return f"{where}, token {at + 1}: the model's tokenizer gives {show(ours)}, the ids given {show(theirs)}"


def check_ids(tokenizer: Tokenizer, text: str, ids: list[list[int]], source: str) -> IdsCheck:
    """Compare the tokenizer's ids for ``text`` with ``ids``: one line of ids per line of text, each
    line's with or without its line-end token (pipelines differ on that); or one sequence for the
    whole text. Raises TextCheckError when the line counts match neither."""
    lines = text.splitlines()
    if len(ids) == 1 and len(lines) != 1:
        ours = tokenizer.encode(text).ids
        diff = "" if ours == ids[0] else _difference(tokenizer, "the sequence", ours, ids[0])
        return IdsCheck(source, 1, int(not diff), diff)
    if len(ids) != len(lines):
        raise TextCheckError(f"{source} has {len(ids)} lines and the text {len(lines)}: give one line of ids per "
                             "line of text, or the whole text's ids on one line")  # fmt: skip
    reproduced, first = 0, ""
    for n, (line, theirs) in enumerate(zip(lines, ids, strict=True), 1):
        alone = tokenizer.encode(line).ids
        ended = [*alone, tokenizer.newline_id] if tokenizer.newline_id is not None else alone
        if theirs in (alone, ended):
            reproduced += 1
        elif not first:
            first = _difference(tokenizer, f"line {n}", ended if len(theirs) > len(alone) else alone, theirs)
    return IdsCheck(source, len(lines), reproduced, first)


@dataclass
class Thresholds:
    max_unknown: float = 0.05  # share of the sample's tokens
    max_unreachable: float = 0.01  # share of the vocabulary


@dataclass
class TextCheck:
    """The figures, as recorded in the card's ``verification.text_check``."""

    kind: str
    vocabulary: int
    unreachable: int
    unreachable_examples: list[str]
    sample: str = ""  # "" when no sample text was given
    sample_lines: int = 0
    tokens: int = 0
    unknown: int = 0
    unknown_examples: list[str] = field(default_factory=list)  # the most frequent first
    ids: IdsCheck | None = None

    @property
    def unknown_rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    @property
    def unreachable_share(self) -> float:
        return self.unreachable / self.vocabulary if self.vocabulary else 0.0

    def warnings(self, limits: Thresholds) -> list[str]:
        """One sentence per figure past its threshold: the figure, the threshold, what to do."""
        out = []
        if self.sample and self.unknown_rate > limits.max_unknown:
            out.append(f"{self.unknown_rate:.1%} of {self.sample}'s {self.tokens} tokens became the unknown token "
                       f"(threshold {limits.max_unknown:.1%}, --max-unknown), e.g. {', '.join(self.unknown_examples)}: "
                       f"{ADVICE}")  # fmt: skip
        if self.unreachable_share > limits.max_unreachable:
            out.append(f"{self.unreachable} of the {self.vocabulary} vocabulary entries ({self.unreachable_share:.1%}) "
                       f"cannot come from any text through the {self.kind} tokenizer (threshold "
                       f"{limits.max_unreachable:.1%}, --max-unreachable), "
                       f"e.g. {', '.join(self.unreachable_examples)}: {ADVICE}")  # fmt: skip
        if self.ids and self.ids.reproduced < self.ids.lines:
            out.append(f"the model's tokenizer reproduces {self.ids.reproduced} of the {self.ids.lines} lines of "
                       f"{self.ids.source} (threshold: all); first difference at {self.ids.first_difference}: "
                       f"{ADVICE}")  # fmt: skip
        return out

    def to_dict(self, limits: Thresholds) -> dict[str, Any]:
        data: dict[str, Any] = {
            "tokenizer": self.kind,
            "vocabulary": self.vocabulary,
            "unreachable": self.unreachable,
            "unreachable_share": self.unreachable_share,
            "unreachable_examples": self.unreachable_examples,
        }
        if self.sample:
            data |= {"sample": self.sample, "sample_lines": self.sample_lines, "tokens": self.tokens,
                     "unknown": self.unknown, "unknown_rate": self.unknown_rate,
                     "unknown_examples": self.unknown_examples}  # fmt: skip
        if self.ids:
            data["ids"] = {"source": self.ids.source, "lines": self.ids.lines, "reproduced": self.ids.reproduced,
                           "share": self.ids.share, "first_difference": self.ids.first_difference}  # fmt: skip
        data["thresholds"] = {"max_unknown": limits.max_unknown, "max_unreachable": limits.max_unreachable}
        data["warnings"] = self.warnings(limits)
        return data


def check_text(
    tokenizer: Tokenizer, text: str | None = None, sample: str = "", ids: Sequence[list[int]] | None = None,
    ids_source: str = "",
) -> TextCheck:  # fmt: skip
    """The text check of ``tokenizer``: unreachable entries always; with a sample ``text`` (named
    ``sample``), its unknown tokens; with ``ids`` for that text (from ``ids_source``), the ids check."""
    unreachable = unreachable_entries(tokenizer)
    check = TextCheck(tokenizer.kind, len(tokenizer), len(unreachable),
                      [repr(tokenizer.pieces[i]) for i in unreachable[:EXAMPLES]])  # fmt: skip
    if text is None:
        return check
    encoded = tokenizer.encode(text)
    unknown = Counter(p for p, u in zip(encoded.pieces, encoded.unknown, strict=True) if u)
    check.sample, check.sample_lines, check.tokens = sample, len(text.splitlines()), len(encoded.ids)
    check.unknown, check.unknown_examples = unknown.total(), [repr(p) for p, _ in unknown.most_common(EXAMPLES)]
    if ids is not None:
        check.ids = check_ids(tokenizer, text, list(ids), ids_source)
    return check
