"""The tokenizer of a training run: chosen by ``lstmd-export train --tokenizer``, fitted on the
training split, and kept in the run folder in the model folder's own formats, so that the
baseline, the export and the server all tokenize as training did.

- ``words`` (lstmd's word tokenizer, lowercased unless ``keep_case``), ``whitespace``
  (pre-tokenized text, case kept unless ``lowercase``) and ``characters``: ``vocab.txt``, given
  or built from the training split (the ``vocab_size`` most frequent tokens, or every token seen
  ``min_count`` times or more; the others become ``<unk>``).
- ``bpe`` and ``unigram``: a subword tokenizer trained with Hugging Face ``tokenizers`` on the
  training split and saved as ``tokenizer.json`` (the model folder's ``hf`` kind): byte-level BPE
  as GPT-2's, or a Unigram model over Metaspace pieces as SentencePiece's.

Every kind turns a newline into ``<eos>``, so lines end with the same token whatever the kind.
The spec is recorded in the run's split.json under ``"tokenizer"`` (absent in runs written
before it was: those used ``words``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lstmd.export.errors import ExportError
from lstmd.model.folder import ModelFormatError, open_tokenizer
from lstmd.model.tokenizer import (
    EOS,
    UNK,
    CharactersTokenizer,
    Tokenizer,
    TokenizerSpec,
    Vocab,
    WhitespaceTokenizer,
    WordsTokenizer,
)

if TYPE_CHECKING:
    import tokenizers

TRAIN_KINDS = ("words", "whitespace", "characters", "bpe", "unigram")
SUBWORD_KINDS = ("bpe", "unigram")


@dataclass(frozen=True)
class TokenizerChoice:
    """What ``lstmd-export train`` was asked for (its ``--tokenizer`` flags)."""

    kind: str = "words"  # one of TRAIN_KINDS
    keep_case: bool = False  # words: do not lowercase
    lowercase: bool = False  # the other kinds: fold to lower case
    vocab_file: str = ""  # a given vocabulary, one token per line; "": build one
    vocab_size: int = 10000  # the most frequent tokens, <unk> and <eos> included
    min_count: int = 0  # > 0: instead, every token seen at least this often
    subword_vocab_size: int = 8000  # bpe, unigram

    def spec(self) -> TokenizerSpec:
        """The model folder's spec for this choice. Raises ExportError for options that do not fit."""
        if self.kind not in TRAIN_KINDS:
            raise ExportError(f"tokenizer kind {self.kind!r} is not one of {', '.join(TRAIN_KINDS)}")
        if self.keep_case and self.kind != "words":
            raise ExportError("--keep-case is the words kind's: the other kinds keep case unless --lowercase")
        if self.lowercase and self.kind == "words":
            raise ExportError("the words kind lowercases already (--keep-case keeps case)")
        if self.kind in SUBWORD_KINDS:
            if self.vocab_file or self.min_count:
                raise ExportError(f"the {self.kind} kind learns its vocabulary: use --subword-vocab-size")
            return TokenizerSpec("hf", lowercase=self.lowercase, unk=UNK, eos=EOS, newline=EOS)
        if self.kind == "words":
            return TokenizerSpec("words", keep_case=self.keep_case)
        return TokenizerSpec(self.kind, lowercase=self.lowercase)


def fit_tokenizer(run: Path, choice: TokenizerChoice, train_texts: Sequence[str]) -> Tokenizer:
    """Write the run's tokenizer file (vocab.txt or tokenizer.json), fitted on ``train_texts``
    unless a vocabulary is given, and return the tokenizer read back from it."""
    spec = choice.spec()
    path = run / spec.path
    if spec.kind == "hf":
        _train_subword(choice, train_texts).save(str(path))
    elif choice.vocab_file:
        shutil.copyfile(choice.vocab_file, path)
    else:
        reader = _pieces_reader(spec)
        pieces = (p for text in train_texts for p in reader.encode(text).pieces)
        max_size = sys.maxsize if choice.min_count else choice.vocab_size
        Vocab.build(pieces, max_size, max(choice.min_count, 1)).save(path)
    try:
        return open_tokenizer(run, spec)
    except ModelFormatError as e:
        raise ExportError(str(e)) from e


def _pieces_reader(spec: TokenizerSpec) -> Tokenizer:
    """A tokenizer of the kind over no vocabulary but its special tokens: its pieces are the
    text's tokens, which the vocabulary is then built from."""
    if spec.kind == "words":
        return WordsTokenizer(spec, Vocab([UNK, EOS]))
    kind = WhitespaceTokenizer if spec.kind == "whitespace" else CharactersTokenizer
    return kind(spec, [UNK, EOS])


def _train_subword(choice: TokenizerChoice, train_texts: Sequence[str]) -> tokenizers.Tokenizer:
    """A ``tokenizers`` tokenizer trained on the lines of ``train_texts`` (each line is encoded on
    its own, the newline becoming ``<eos>``)."""
    from tokenizers import Tokenizer as Library
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [UNK, EOS]
    if choice.kind == "bpe":
        library = Library(models.BPE(unk_token=UNK))
        library.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        library.decoder = decoders.ByteLevel()
        trainer: trainers.Trainer = trainers.BpeTrainer(
            vocab_size=choice.subword_vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        library = Library(models.Unigram())
        library.pre_tokenizer = pre_tokenizers.Metaspace()
        library.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=choice.subword_vocab_size, special_tokens=specials, unk_token=UNK)
    lines = (line.lower() if choice.lowercase else line for text in train_texts for line in text.split("\n"))
    library.train_from_iterator((line for line in lines if line), trainer)
    return library


def run_spec(run: Path) -> TokenizerSpec:
    """The tokenizer spec a training run recorded (``words`` for runs from before it did)."""
    record = json.loads((run / "split.json").read_text())
    return TokenizerSpec.from_dict(record.get("tokenizer", {}))


def open_run_tokenizer(run: Path) -> Tokenizer:
    """The tokenizer of a training run, as the model folder will hold it."""
    return open_tokenizer(run, run_spec(run))


def tokenizer_from_run(run: Path) -> tuple[TokenizerSpec, Vocab | Path]:
    """What ``lstmd-export onnx`` needs of a run's tokenizer (as its flags give it): the spec,
    and the vocabulary for the words kind or the file to copy for the others."""
    spec = run_spec(run)
    path = run / spec.path
    return spec, Vocab.load(path) if spec.kind == "words" else path
