"""lstmd's word tokenizer rebuilt as a Hugging Face ``tokenizers`` pipeline, against the hand-written
one (``lstmd.model.tokenizer.tokenize`` + ``Vocab.encode``, what ``WordsTokenizer.encode`` does).

    python -m bench.tokenizer_speed [--runs 5] [--quick]

Prints, for the bundled model's vocabulary:
- equality, document by document, of ids, pieces and unknown flags on the bundled corpus's test
  split and (unless ``--quick``) on the whole corpus, with every difference and the text around it;
- the same on awkward inputs (other scripts, combining marks, emoji, CRLF, tabs, ...);
- tokens per second of both (and of the library's call alone), the median of ``--runs`` runs, on
  the test split's documents and on feed-sized texts of 10 words (the server tokenizes one short
  feed at a time, so the cost of a call matters as much as the cost of a token).

The pipeline: normalizers removing format characters (``\\p{Cf}``), NFKC, a final capital sigma to
``ς`` (Python's ``str.lower`` does that, the library's ``Lowercase`` maps each character alone),
curly quotes to straight ones, lowercase;
pre-tokenizers splitting off whitespace and underscores (removed), then ``_TOKEN``'s alternatives
written with Unicode properties (isolated), with each line end (``\\r\\n``, ``\\r``, ``\\n``) its own
piece; a ``WordLevel`` model over ``vocab.txt`` in which the line ends are ``<eos>``'s id.
"""

# ruff: noqa: RUF001  (the awkward inputs are look-alike characters on purpose)
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from lstmd.export.cli import DEFAULT_CORPUS
from lstmd.export.corpus import Document, cut_blocks, load_corpus, split_documents
from lstmd.model.tokenizer import EOS, UNK, Encoding, TokenizerSpec, Vocab, WordsTokenizer

VOCAB = Path(__file__).resolve().parents[1] / "server" / "models" / "pd-english" / "1" / "vocab.txt"
BLOCK_WORDS = 20_000  # the bundled model's split (its card)
FEED_WORDS = 10

# Python's classes in Oniguruma's terms: [^\W\d_] is a letter or a number that is not a decimal
# digit (², ½, Ⅻ); \d a decimal digit; [^\w\s] neither, nor whitespace (Python's includes \x1c-\x1f).
_LETTER = r"[\p{L}\p{Nl}\p{No}]"
_DIGIT = r"\p{Nd}"
_TOKEN = (
    rf"{_LETTER}+(?:['\-]{_LETTER}+)*"
    rf"|{_DIGIT}+(?:[.,]{_DIGIT}+)*"
    r"|[^\p{L}\p{N}\s\x1c-\x1f_]"
    r"|\r\n?|\n"  # a line end: <eos>
)
_SEPARATOR = r"[^\S\r\n]+|[\x1c-\x1f_]+"  # whitespace but line ends, and the underscores lstmd drops
_LINE_ENDS = ("\n", "\r", "\r\n")

AWKWARD = [
    "ΟΔΟΣ ΣΑΣ Σ ΟΔΟΣ'Α",
    "Straße İstanbul ǅ Ǆ",
    "naïve café, decomposed: cafe\u0301, a\u0305b",
    "١٢٣ ٤.٥ ۱۲ १२३ ١,٠٠٠ ๑๒",
    "x² ½ Ⅻ ① 〇 🯱",
    "emoji 👍🏽 👨\u200d👩\u200d👧 🇬🇧 ❤️",
    "a\r\nb\rc\n\nd\r\r\n",
    "tab\there\x0bv\x0cf\x1cx\x85y\u2028z",
    "it's twenty-one don't -x- 'a' ''",
    "1,000 3.5 1.2.3 1,,2 1. .5",
    "_italic_ __x__ ＿",
    "\u201cquoted\u201d \u2018single\u2019",
    "ﬁne ＡＢＣ ｶﾀｶﾅ 漢字かな ㋿",
    "क़ ꟲ",
    "",
    "\n",
    " \n ",
    "<unk> <eos>",
    "\u200bzero\u200dwidth\ufeff",
    "\u202eright\u202c \u2066isolated\u2069 soft\u00adhyphen \u061c\u200e\u200f \U000e0041",
    "xylograph Zyzzyva",
]


def pipeline(vocab: Vocab, lowercase: bool = True) -> Tokenizer:
    """lstmd's ``words`` tokenizer (``tokenize`` then ``Vocab.encode``) as a ``tokenizers`` pipeline."""
    ids = {**vocab.ids, **dict.fromkeys(_LINE_ENDS, vocab.eos_id)}
    library = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(Regex(r"\p{Cf}"), ""), normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Replace(Regex(r"(?<=\p{Cased})Σ(?!\p{Case_Ignorable}*\p{Cased})"), "ς"))
    steps += [normalizers.Replace(Regex("[\u2018\u2019]"), "'"), normalizers.Replace(Regex("[\u201c\u201d]"), '"')]
    if lowercase:
        steps.append(normalizers.Lowercase())
    library.normalizer = normalizers.Sequence(steps)
    library.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SEPARATOR), "removed"), pre_tokenizers.Split(Regex(_TOKEN), "isolated")]
    )
    return library


class PipelineWords:
    """``WordsTokenizer.encode`` over the pipeline: the same ids, pieces and unknown flags.

    The library names an unknown word ``<unk>`` and a line end by itself, where lstmd gives the
    word as normalized and ``<eos>``; so the pieces of a text with unknown words come from the
    pipeline's normalizer and pre-tokenizer, run once more."""

    def __init__(self, vocab: Vocab, lowercase: bool = True):
        self.library = pipeline(vocab, lowercase)
        self.unk_id, self.eos_id = vocab.unk_id, vocab.eos_id

    def words(self, text: str) -> list[str]:
        normalizer, pre_tokenizer = self.library.normalizer, self.library.pre_tokenizer
        assert normalizer is not None and pre_tokenizer is not None
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        return [EOS if piece in _LINE_ENDS else piece for piece, _ in pieces]

    def call(self, text: str) -> object:
        """The library's encode alone, ids and tokens read: the least the pipeline can cost."""
        encoded = self.library.encode(text, add_special_tokens=False)
        return encoded.ids, encoded.tokens

    def encode(self, text: str) -> Encoding:
        encoded = self.library.encode(text, add_special_tokens=False)
        ids, unk = encoded.ids, self.unk_id
        if unk in ids:
            pieces = self.words(text)
        elif self.eos_id in ids:
            pieces = [EOS if piece in _LINE_ENDS else piece for piece in encoded.tokens]
        else:
            pieces = encoded.tokens
        return Encoding(ids, pieces, [i == unk for i in ids])


@dataclass(frozen=True)
class Difference:
    name: str
    index: int  # the first token where the two differ
    hand: list[str]  # pieces around it, id in brackets where the ids differ
    library: list[str]
    text: str  # the text around it

    def __str__(self) -> str:
        return f"{self.name} token {self.index}: {self.text!r}\n    hand:    {self.hand}\n    library: {self.library}"


def _around(encoding: Encoding, other: Encoding, start: int) -> list[str]:
    out = []
    for i in range(max(0, start - 3), min(len(encoding.ids), start + 4)):
        same = i < len(other.ids) and other.ids[i] == encoding.ids[i]
        out.append(encoding.pieces[i] if same else f"{encoding.pieces[i]}[{encoding.ids[i]}]")
    return out


def compare(docs: Sequence[Document], hand: WordsTokenizer, library: PipelineWords) -> tuple[int, list[Difference]]:
    """Tokens compared (the hand-written count) and the documents whose encodings differ."""
    tokens = 0
    found: list[Difference] = []
    for doc in docs:
        a, b = hand.encode(doc.text), library.encode(doc.text)
        tokens += len(a.ids)
        if (a.ids, a.pieces, a.unknown) == (b.ids, b.pieces, b.unknown):
            continue
        first = next((i for i, (x, y) in enumerate(zip(a.pieces, b.pieces, strict=False)) if x != y), None)
        if first is None:
            first = next(
                (i for i, (x, y) in enumerate(zip(a.ids, b.ids, strict=False)) if x != y), min(len(a.ids), len(b.ids))
            )
        offsets = library.library.encode(doc.text, add_special_tokens=False).offsets
        at = offsets[min(first, len(offsets) - 1)][0] if offsets else 0
        found.append(
            Difference(doc.name, first, _around(a, b, first), _around(b, a, first), doc.text[max(0, at - 40) : at + 40])
        )
    return tokens, found


def tokens_per_second(
    encode: Callable[[str], object], texts: Sequence[str], tokens: int, runs: int
) -> tuple[float, float]:
    """(tokens per second, microseconds per call), the median of ``runs`` passes over ``texts``."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        for text in texts:
            encode(text)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return tokens / median, median / len(texts) * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tokenizer_speed", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="timed passes; the median is reported")
    p.add_argument("--quick", action="store_true", help="the test split only, and 1 timed pass")
    args = p.parse_args(argv)
    runs = 1 if args.quick else args.runs

    vocab = Vocab.load(VOCAB)
    hand, library = WordsTokenizer(TokenizerSpec(), vocab), PipelineWords(vocab)
    docs = cut_blocks(load_corpus(DEFAULT_CORPUS), BLOCK_WORDS)
    test = split_documents(docs)["test"]

    print("Equality of ids, pieces and unknown flags, document by document (hand-written vs pipeline)")
    for label, part in [("test split", test)] + ([] if args.quick else [("whole corpus", docs)]):
        tokens, found = compare(part, hand, library)
        verdict = "identical" if not found else f"{len(found)} document(s) differ"
        print(f"  {label}: {len(part)} documents, {tokens:,} tokens: {verdict}")
        for difference in found:
            print("   ", difference)
    awkward = [Document(repr(text), text) for text in AWKWARD]
    _, found = compare(awkward, hand, library)
    print(f"  awkward inputs: {len(awkward) - len(found)} of {len(awkward)} identical")
    for difference in found:
        print("   ", difference)

    texts = [doc.text for doc in test]
    words = " ".join(texts).split(" ")
    feeds = [" ".join(words[i : i + FEED_WORDS]) for i in range(0, min(len(words), 30_000), FEED_WORDS)]
    print(f"Speed, median of {runs} run(s): tokens per second (microseconds per call)")
    for label, inputs in (("test split documents", texts), (f"{len(feeds)} feeds of {FEED_WORDS} words", feeds)):
        tokens = sum(len(hand.encode(text).ids) for text in inputs)
        hand_rate, hand_us = tokens_per_second(hand.encode, inputs, tokens, runs)
        library_rate, library_us = tokens_per_second(library.encode, inputs, tokens, runs)
        call_rate, call_us = tokens_per_second(library.call, inputs, tokens, runs)
        print(f"  {label}: hand-written {hand_rate:,.0f} ({hand_us:,.1f} us), pipeline {library_rate:,.0f} "
              f"({library_us:,.1f} us), its library call alone {call_rate:,.0f} ({call_us:,.1f} us): "
              f"the pipeline takes {hand_rate / library_rate:.1f}x the time, its call alone "
              f"{hand_rate / call_rate:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
