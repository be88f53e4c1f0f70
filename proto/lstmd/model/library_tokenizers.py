"""The tokenizer kinds read with the libraries made for them: ``hf`` (a Hugging Face
``tokenizers`` ``tokenizer.json``: BPE, WordPiece, Unigram or WordLevel) and ``sentencepiece``
(a SentencePiece ``.model``). Ids, pieces and decoding come from the library; each class imports
its library when a model of its kind is loaded, so the server needs only the libraries its
models use, and the client (which imports ``lstmd.model.tokenizer``) never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lstmd.model.tokenizer import Encoding, Tokenizer, TokenizerSpec


class HuggingFaceTokenizer(Tokenizer):
    """``tokenizers.Tokenizer.from_file``. Text is encoded without the post-processor's special
    tokens (a feed continues a session: the session's start stands for the beginning). The
    unknown token is the model's own (BPE, WordPiece, WordLevel) unless the spec names one; eos
    and bos exist only when the spec names them. Sessions start after bos if named, else eos."""

    kind = "hf"

    def __init__(self, spec: TokenizerSpec, path: Path):
        from tokenizers import Tokenizer as Library

        self.library = Library.from_file(str(path))
        size = self.library.get_vocab_size(with_added_tokens=True)
        pieces = [self.library.id_to_token(i) for i in range(size)]
        holes = [i for i, p in enumerate(pieces) if p is None]
        if holes:
            raise ValueError(f"{path.name} has no token for id(s) {holes[:5]}: ids must run from 0 to {size - 1}")
        model_unk = getattr(self.library.model, "unk_token", None)
        unk = self._special(spec.unk, "unknown") if spec.unk else self.token_id(model_unk) if model_unk else None
        eos = self._special(spec.eos, "eos") if spec.eos else None
        bos = self._special(spec.bos, "bos") if spec.bos else None
        super().__init__(spec, [p for p in pieces if p is not None], unk, eos, bos)

    def token_id(self, piece: str) -> int | None:
        return self.library.token_to_id(piece)

    def _library_special_ids(self) -> Sequence[int]:
        return [i for i, added in self.library.get_added_tokens_decoder().items() if added.special]

    def _encode_line(self, text: str) -> Encoding:
        encoded = self.library.encode(text, add_special_tokens=False)
        unk = self.unk_id
        return Encoding(encoded.ids, encoded.tokens, [i == unk for i in encoded.ids])

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode_lines(ids, self.library.decode)


class SentencePieceTokenizer(Tokenizer):
    """``sentencepiece.SentencePieceProcessor``. The unknown, eos and bos tokens are the model's
    own (``unk_id``, ``eos_id``, ``bos_id``) unless the spec names others; sessions start after
    bos if the model has one, else eos."""

    kind = "sentencepiece"

    def __init__(self, spec: TokenizerSpec, path: Path):
        import sentencepiece

        self.library = sentencepiece.SentencePieceProcessor(model_file=str(path))
        pieces = [self.library.id_to_piece(i) for i in range(self.library.get_piece_size())]
        self._ids = {p: i for i, p in enumerate(pieces)}

        def special(name: str | None, own: int, role: str) -> int | None:
            return self._special(name, role) if name else own if own >= 0 else None

        unk = special(spec.unk, self.library.unk_id(), "unknown")
        eos = special(spec.eos, self.library.eos_id(), "eos")
        bos = special(spec.bos, self.library.bos_id(), "bos")
        super().__init__(spec, pieces, unk, eos, bos)

    def token_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def _library_special_ids(self) -> Sequence[int]:
        return [i for i in range(len(self.pieces)) if self.library.is_control(i) or self.library.is_unknown(i)]

    def _encode_line(self, text: str) -> Encoding:
        ids: list[int] = self.library.encode(text)
        unk = self.unk_id
        return Encoding(ids, [self.pieces[i] for i in ids], [i == unk for i in ids])

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode_lines(ids, self.library.decode)
