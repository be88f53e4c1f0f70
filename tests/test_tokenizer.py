"""The tokenizer and vocabulary shared by training and the server."""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lstmd.model.tokenizer import (
    _FORMAT,
    EOS,
    UNK,
    TextTooLong,
    TokenizerSpec,
    Vocab,
    WordsTokenizer,
    detokenize,
    tokenize,
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", []),
        ("   ", []),
        ("?!...", ["?", "!", ".", ".", "."]),
        ("The Clouds are in the SKY.", ["the", "clouds", "are", "in", "the", "sky", "."]),
        ("don't, twenty-one", ["don't", ",", "twenty-one"]),
        ("In 1945 it cost 3.5 or 1,000.", ["in", "1945", "it", "cost", "3.5", "or", "1,000", "."]),
        ("one\r\ntwo\rthree\nfour", ["one", EOS, "two", EOS, "three", EOS, "four"]),
        ("Café Ünïcode naïve", ["café", "ünïcode", "naïve"]),
        ("\u201cHi,\u201d she said \u2018so\u2019", ['"', "hi", ",", '"', "she", "said", "'", "so", "'"]),
        ("_italic_ text", ["italic", "text"]),
        ("\ufeffthe ki\u00adng\u200b \u202eand\u202c qu\u200deen\u2069", ["the", "king", "and", "queen"]),
        ("\u200b\u200c\u200d\u2060\ufeff \u200e\u200f\u202a\u202b\u202d\u2066\u2067\u2068", []),
        ("cafe\u200b\u0301", ["café"]),  # dropped before NFKC: the accent joins its letter
    ],
)
def test_tokenize(text: str, words: list[str]) -> None:
    assert tokenize(text) == words


def test_the_format_characters_dropped_are_unicodes_category_cf() -> None:
    """``_FORMAT`` is written out; it must be exactly Python's format characters (Cf)."""
    listed = {c for c in range(sys.maxunicode + 1) if _FORMAT.fullmatch(chr(c))}
    format_characters = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}
    assert listed == format_characters, (
        f"update _FORMAT in lstmd/model/tokenizer.py to Unicode {unicodedata.unidata_version}: add "
        f"{sorted(map(hex, format_characters - listed))}, remove {sorted(map(hex, listed - format_characters))}"
    )


def test_very_long_word_stays_one_token() -> None:
    word = "a" * 10_000
    assert tokenize(word) == [word]


def test_a_long_line_gives_the_same_tokens_matched_one_at_a_time() -> None:
    line = "it's 3.5, twenty-one (x) " * 1000  # 25,000 characters: over _LONG_LINE
    assert tokenize(line) == tokenize(line[:25]) * 1000


def test_the_character_limit_holds_once_normalised() -> None:
    """NFKC spells U+FDFA out in 18 characters, ﬁ in 2; combining accents shrink a text. Text over
    the limit once normalised is refused, text within it is not, wherever the pieces it is measured
    in are cut (here between letters and their accents)."""
    assert len(tokenize("\ufdfa" * 5000, max_chars=90_000)) == 15_001  # its last word joins the next one's first
    for text, limit in (("\ufdfa" * 5001, 90_000), ("\ufb01" * 50_001, 100_000), ("\ufdfa" * 100_000, 100_000)):
        with pytest.raises(TextTooLong):
            tokenize(text, max_chars=limit)
    accented = "x " + "e\u0301" * 49_998  # 99,998 characters, 50,000 once composed
    assert len(tokenize(accented, max_chars=50_000)) == 2
    with pytest.raises(TextTooLong) as refused:
        tokenize(accented + "e", max_chars=50_000)
    assert (refused.value.length, refused.value.at_least) == (50_001, False)


def test_detokenize_reads_naturally() -> None:
    text = 'he said, "the end (of it)." then: why? 50% of $ 3!'
    assert detokenize(tokenize(text)) == 'he said, "the end (of it)." then: why? 50% of $3!'
    assert detokenize(["one", EOS, "two", "."]) == "one\ntwo."


@given(st.text(max_size=200))
def test_tokenize_detokenize_round_trip_is_stable(text: str) -> None:
    """Re-tokenizing detokenized text gives the same tokens (apart from lost spacing)."""
    words = tokenize(text)
    assert tokenize(detokenize(words)) == words


def test_vocab_build_encode_decode_and_save(tmp_path: Path) -> None:
    words = tokenize("the cat saw the dog . the end .")
    vocab = Vocab.build(words, max_size=5)
    assert vocab.words[:2] == [UNK, EOS]
    assert vocab.words[2:] == ["the", ".", "cat"]  # most frequent first, ties alphabetical
    assert len(vocab) == 5
    ids = vocab.encode_text("the zebra.\n")
    assert ids == [vocab.ids["the"], vocab.unk_id, vocab.ids["."], vocab.eos_id]
    assert vocab.decode(ids) == ["the", UNK, ".", EOS]
    vocab.save(tmp_path / "vocab.txt")
    assert Vocab.load(tmp_path / "vocab.txt").words == vocab.words


@pytest.mark.parametrize("words", [["a", "b"], [UNK, "a"], [UNK, EOS, "a", "a"]])
def test_vocab_rejects_missing_specials_and_duplicates(words: list[str]) -> None:
    with pytest.raises(ValueError, match=r"special|duplicate"):
        Vocab(words)


def test_the_words_text_stream_keeps_a_quote_open_over_any_distance() -> None:
    quote = 'he said , " i will go to the city with my dog and the cat tomorrow , " said he .'.split()  # noqa: SIM905
    vocab = Vocab([UNK, EOS, *dict.fromkeys(quote)])
    tokenizer = WordsTokenizer(TokenizerSpec(), vocab)
    stream = tokenizer.text_stream(vocab.encode(["he", "said"]))
    texts = [stream.add(i) for i in vocab.encode(quote[2:])]
    assert "".join(texts) == ', "i will go to the city with my dog and the cat tomorrow," said he.'
    assert texts[:3] == [",", ' "', "i"] and texts[-5:] == [",", '"', " said", " he", "."]
    fresh = tokenizer.text_stream([vocab.eos_id])  # a new session starts after <eos>: no space first
    assert [fresh.add(i) for i in vocab.encode(["he", EOS, "said"])] == ["he", "\n", "said"]


@given(st.lists(st.sampled_from(["a", "b", '"', ",", "(", EOS, "$"]), max_size=60), st.integers(0, 60))
def test_the_words_text_stream_adds_up_to_decoding_everything(words: list[str], split: int) -> None:
    vocab = Vocab([UNK, EOS, "a", "b", '"', ",", "(", "$"])
    tokenizer = WordsTokenizer(TokenizerSpec(), vocab)
    ids = vocab.encode(words)
    stream = tokenizer.text_stream(ids[:split])
    texts = "".join(stream.add(i) for i in ids[split:])
    assert detokenize(words[:split]) + texts == detokenize(words)
