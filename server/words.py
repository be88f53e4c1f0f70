"""Whole-word candidates for every kind of tokenizer, and completion of the word being typed.

A *word* (the contract's definition, in lstmd.v1) is a run of letters and digits, with
apostrophes and hyphens inside it, that follows the session's text after whitespace (or
directly, when that text ends with whitespace or punctuation) and ends at the first other
character or special token.

- Word models (the ``words`` and ``whitespace`` tokenizers) predict words: every token is one.
  A completion of a typed prefix is the most likely tokens that begin with it, read from the
  whole distribution (``WordTable.completions``).
- Subword and character models predict pieces. ``search`` finds the most likely next words by a
  beam search over pieces until the word ends: each step expands every hypothesis (its pieces,
  LSTM state and log-probability) by the pieces that continue its word, keeps the ``beam`` most
  likely, and adds to each word the probability of the pieces that end it there. A word's
  probability is the sum over the spellings found. The steps go through the model's batcher, so
  the beams of concurrent sessions share ONNX Runtime calls.

What a piece does to a hypothesis depends only on the piece's text, decoded once per model after
a word (``WordTable``), and on where the hypothesis is: inside a word, or before one with or
without a separator still to come. So a step is a few numpy masks over each distribution, plus a
Python loop over the rare pieces that end a word inside themselves.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lstmd.model.tokenizer import Tokenizer

JOINERS = "'-"  # inside a word they join its parts ("don't", "twenty-one"); at its ends they are not part of it
WORD_LEVEL = ("words", "whitespace")  # tokenizer kinds whose every token is a word

# Where a hypothesis is: inside a word, before one that must be separated from the text (which
# ends with a word character), or before one after a separator (or punctuation, or nothing).
IN_WORD, NEEDS_SEPARATOR, AFTER_SEPARATOR = range(3)
# What a piece does to it: nothing that leads to a word; continues (or starts) the word; ends the
# word before the piece; ends it inside the piece, after the piece's leading word characters;
# or is more whitespace before the word.
LOST, EXTEND, FINISH, FINISH_INSIDE, SEPARATOR = range(5)


_NOT_SPACE = "\x1c\x1d\x1e\x1f"  # str.isspace() calls these separators; they are control characters


def _strip_space(text: str) -> str:
    """``text`` without its leading whitespace."""
    n = 0
    while n < len(text) and text[n].isspace() and text[n] not in _NOT_SPACE:
        n += 1
    return text[n:]


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in JOINERS


def _leading_run(text: str) -> str:
    """The word characters ``text`` starts with."""
    n = 0
    while n < len(text) and _is_word_char(text[n]):
        n += 1
    return text[:n]


def _outcome(where: int, text: str, special: bool) -> tuple[int, str]:
    """What a piece that adds ``text`` does to a hypothesis at ``where``, and the word characters
    it contributes. The one definition of a word boundary; ``WordTable`` tabulates it."""
    if "\ufffd" in text or (not text and not special):  # a piece of a character, or of nothing
        return LOST, ""
    core = _strip_space(text)
    spaced = len(core) < len(text)
    run = _leading_run(core)
    if where == IN_WORD:
        if special or spaced or not run:
            return FINISH, ""
        return (EXTEND if run == core else FINISH_INSIDE), run
    if special or (not run and core):
        return LOST, ""
    if not run:
        return SEPARATOR, ""
    if where == NEEDS_SEPARATOR and not spaced:
        return LOST, ""  # it would continue the text's last word
    return (EXTEND if run == core else FINISH_INSIDE), run


def piece_texts(tokenizer: Tokenizer) -> list[str]:
    """The text each token adds after a word, decoded by the tokenizer ("" for special tokens):
    " sky" for "▁sky" or "Ġsky", "ky" for "ky". A token whose text is not an extension of the
    text before (a piece of a multi-byte character) gets U+FFFD."""
    special = tokenizer.special_ids
    anchor = next((i for i in range(len(tokenizer)) if i not in special
                   and (t := tokenizer.decode([i])).isalnum() and tokenizer.decode([i, i]) == t + t), None)  # fmt: skip
    if anchor is None:
        raise ValueError(f"no token of this {tokenizer.kind} tokenizer decodes to a word that repeats as itself")
    before = tokenizer.decode([anchor])
    texts = []
    for i in range(len(tokenizer)):
        text = "" if i in special else tokenizer.decode([anchor, i])
        texts.append(text[len(before) :] if text.startswith(before) or i in special else "\ufffd")
    return texts


class PrefixIndex:
    """Token ids by spelling: those whose spelling begins with a string, and those whose spelling is
    a proper beginning of it."""

    def __init__(self, spellings: Sequence[str]):
        order = sorted((s, i) for i, s in enumerate(spellings) if s)
        self._keys = [s for s, _ in order]
        self._ids = np.array([i for _, i in order], np.int64)
        self._by_spelling: dict[str, list[int]] = {}
        for s, i in order:
            self._by_spelling.setdefault(s, []).append(i)

    def beginning_with(self, prefix: str) -> np.ndarray:
        lo = bisect_left(self._keys, prefix)
        return self._ids[lo : bisect_left(self._keys, prefix + "\U0010ffff", lo)]

    def beginnings_of(self, text: str) -> list[int]:
        return [i for n in range(1, len(text)) for i in self._by_spelling.get(text[:n], ())]


class WordTable:
    """A model's tokens as words: which are special, and, for subword and character models, what
    each does to a hypothesis of the beam (``_outcome`` for every token and place, as arrays)."""

    def __init__(self, tokenizer: Tokenizer):
        size = len(tokenizer)
        self.word_level = tokenizer.kind in WORD_LEVEL
        self.special = np.zeros(size, bool)
        self.special[list(tokenizer.special_ids)] = True
        self.special_count = int(self.special.sum())
        if self.word_level:
            self.index = PrefixIndex(tokenizer.pieces)
            return
        texts = piece_texts(tokenizer)
        # the text's last word is open after a token that ends with a word character
        self.ends_word = np.array([bool(t) and _is_word_char(t[-1]) for t in texts])
        table = [[_outcome(where, t, bool(s)) for t, s in zip(texts, self.special, strict=True)] for where in range(3)]
        self.outcomes = np.array([[o for o, _ in row] for row in table], np.int8)  # (where, token)
        self.runs = [run for _, run in table[AFTER_SEPARATOR]]  # a token's word characters (the same wherever)
        self.ids = {(where, o): np.flatnonzero(self.outcomes[where] == o) for where in range(3) for o in range(5)}
        self.index = PrefixIndex(self.runs)
        self.joiner_first = np.array([i for i, run in enumerate(self.runs) if run.startswith(tuple(JOINERS))], np.int64)

    def needs_separator(self, last_token: int) -> bool:
        """Whether a new word after ``last_token`` must begin with whitespace (-1: nothing before it)."""
        return last_token >= 0 and bool(self.ends_word[last_token])

    def completions(self, logprobs: np.ndarray, prefix: str, k: int, exclude_special: bool) -> list[tuple[int, float]]:
        """Word models: the ``k`` most likely tokens that begin with ``prefix``, and their log-probabilities."""
        ids = self.index.beginning_with(prefix) if prefix else np.arange(logprobs.size)
        if exclude_special:
            ids = ids[~self.special[ids]]
        top = ids[np.argsort(-logprobs[ids], kind="stable")[:k]]
        return [(int(i), float(logprobs[i])) for i in top]


@dataclass(slots=True)
class _Hypothesis:
    logprob: float  # of its pieces
    word: str  # the word characters so far ("" before the word starts)
    where: int
    ids: list[int]
    state: np.ndarray  # the LSTM state after ids


@dataclass(slots=True)
class Word:
    """A word the search found: its probability (summed over its spellings) and its most likely spelling."""

    word: str
    probability: float = 0.0
    ids: list[int] = field(default_factory=list)
    best: float = -math.inf  # log-probability of the spelling ``ids``


# Runs single-token steps: (token ids, states) -> (log-probabilities, new state) for each.
Step = Callable[[list[int], list[np.ndarray]], Awaitable[list[tuple[np.ndarray, np.ndarray]]]]


async def search(
    table: WordTable, step: Step, logprobs: np.ndarray, state: np.ndarray, after: int, prefix: str, k: int,
    beam: int, max_tokens: int,
) -> list[Word]:  # fmt: skip
    """The ``k`` most likely next words beginning with ``prefix``, from the distribution ``logprobs``
    of the session's next token and its ``state``, after the token ``after`` (-1: none); most
    likely first. At most ``max_tokens`` tokens from the session's text to the one that ends the
    word (the separator and the word included); fewer than ``k`` words when fewer were found.

    The search stops when the hypotheses kept hold less probability than the k-th word found:
    no word not yet found can then overtake it."""
    where = NEEDS_SEPARATOR if table.needs_separator(after) else AFTER_SEPARATOR
    hypotheses = [_Hypothesis(0.0, "", where, [], state)]
    distributions = [logprobs]
    found: dict[str, Word] = {}
    for length in range(max_tokens):  # the hypotheses hold ``length`` tokens
        expansions: list[tuple[float, int, int, str, int]] = []  # log-probability, hypothesis, token, word, where
        for n, (h, dist) in enumerate(zip(hypotheses, distributions, strict=True)):
            expansions += _expand(table, h, n, dist, prefix, beam, found)
        kept = heapq.nlargest(beam, expansions)
        ranked = sorted((w.probability for w in found.values()), reverse=True)
        if (
            not kept
            or length == max_tokens - 1
            or (len(ranked) >= k and sum(math.exp(e[0]) for e in kept) < ranked[k - 1])
        ):
            break
        parents = [hypotheses[e[1]] for e in kept]
        stepped = await step([e[2] for e in kept], [p.state for p in parents])
        hypotheses = [_Hypothesis(lp, word, w, [*p.ids, token], s)
                      for (lp, _, token, word, w), p, (_, s) in zip(kept, parents, stepped, strict=True)]  # fmt: skip
        distributions = [d for d, _ in stepped]
    return sorted(found.values(), key=lambda w: -w.probability)[:k]


def _expand(
    table: WordTable, h: _Hypothesis, n: int, dist: np.ndarray, prefix: str, beam: int, found: dict[str, Word]
) -> list[tuple[float, int, int, str, int]]:
    """Add the words that ``h`` ends in ``dist`` to ``found``; the best ``beam`` continuations of ``h``."""
    out = []

    def finish(word: str, logprob: float, spelling: float, ids: list[int]) -> None:
        word = word.strip(JOINERS)
        if word and word.startswith(prefix):
            entry = found.setdefault(word, Word(word))
            entry.probability += math.exp(logprob)
            if spelling > entry.best:
                entry.best, entry.ids = spelling, ids

    outcomes = table.outcomes[h.where]
    core = h.word.lstrip(JOINERS)
    if len(core) < len(prefix):  # the typed prefix decides: only the tokens that agree with it
        rest = prefix[len(core) :]
        candidates = [*table.index.beginning_with(rest).tolist(), *table.index.beginnings_of(rest)]
        if not core:  # leading apostrophes and hyphens are not part of the word
            candidates += table.joiner_first.tolist()
        if not h.word:
            candidates += table.ids[h.where, SEPARATOR].tolist()
        for i in dict.fromkeys(candidates):
            lp = h.logprob + float(dist[i])
            word = h.word + table.runs[i]
            grown = word.lstrip(JOINERS)
            if outcomes[i] == SEPARATOR:
                out.append((lp, n, i, "", AFTER_SEPARATOR))
            elif not (grown.startswith(prefix) or prefix.startswith(grown)):
                continue
            elif outcomes[i] == EXTEND:
                out.append((lp, n, i, word, IN_WORD))
            elif outcomes[i] == FINISH_INSIDE:
                finish(word, lp, lp, [*h.ids, i])
        return heapq.nlargest(beam, out)
    if h.where == IN_WORD:
        ending = float(np.exp(dist[table.ids[h.where, FINISH]]).sum())  # (np.logaddexp.reduce: 10x slower)
        if ending > 0:
            finish(h.word, h.logprob + math.log(ending), h.logprob, h.ids)
    for i in table.ids[h.where, FINISH_INSIDE].tolist():
        lp = h.logprob + float(dist[i])
        finish(h.word + table.runs[i], lp, lp, [*h.ids, i])
    for outcome, where in ((EXTEND, IN_WORD), (SEPARATOR, AFTER_SEPARATOR)):
        ids = table.ids[h.where, outcome]
        if ids.size > beam:
            ids = ids[np.argpartition(-dist[ids], beam)[:beam]]
        for i in ids.tolist():
            word = h.word + table.runs[i] if outcome == EXTEND else ""
            out.append((h.logprob + float(dist[i]), n, i, word, where))
    return out
