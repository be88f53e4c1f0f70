"""Corpus loading in any common encoding, and the deterministic document-level split."""

from __future__ import annotations

import gzip
from pathlib import Path

from lstmd.export.cli import DEFAULT_CORPUS
from lstmd.export.corpus import Document, cut_blocks, decode_bytes, load_corpus, split_documents, unwrap
from lstmd.model.folder import read_model_dir
from lstmd.server.settings import BUNDLED_MODELS


def test_decodes_utf8_latin1_cp1252_crlf_and_gzip(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/utf8.txt").write_bytes("naïve café\n".encode())
    (tmp_path / "a/latin1.txt").write_bytes("caf\xe9 na\xefve\r\n".encode("latin-1"))
    (tmp_path / "a/cp1252.txt").write_bytes("\u201cquoted\u201d\r\nline two\r\n".encode("cp1252"))
    (tmp_path / "a/packed.txt.gz").write_bytes(gzip.compress(b"zipped words\n"))
    (tmp_path / "a/ignored.md").write_text("not a corpus file")
    docs = {d.name: d for d in load_corpus(tmp_path)}
    assert sorted(docs) == ["a/cp1252.txt", "a/latin1.txt", "a/packed.txt", "a/utf8.txt"]
    assert docs["a/utf8.txt"].words == ["naïve", "café", "<eos>"]
    assert docs["a/latin1.txt"].words == ["café", "naïve", "<eos>"]
    assert docs["a/cp1252.txt"].words == ['"', "quoted", '"', "<eos>", "line", "two", "<eos>"]
    assert docs["a/packed.txt"].words == ["zipped", "words", "<eos>"]
    assert "\r" not in docs["a/cp1252.txt"].text


def test_decode_bytes_never_fails() -> None:
    assert decode_bytes(bytes(range(256)))


def test_unwrap_joins_prose_and_keeps_verse() -> None:
    prose = (
        "This is a long line of prose that was hard wrapped at a width\nof about seventy characters, like Gutenberg.\n"
    )
    verse = "Tyger Tyger, burning bright,\nIn the forests of the night;\n"
    text = unwrap(prose + "\n" + verse)
    assert text.splitlines() == [
        prose.replace("\n", " ").strip(),
        "Tyger Tyger, burning bright,",
        "In the forests of the night;",
    ]


def _corpus(tmp_path: Path) -> Path:
    for folder, count in (("books", 6), ("speeches", 12)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            (tmp_path / folder / f"doc{i}.txt").write_text(f"{folder} {i} " * (100 + 37 * i) + "\n")
    return tmp_path


def test_split_is_by_document_deterministic_and_stratified(tmp_path: Path) -> None:
    docs = load_corpus(_corpus(tmp_path))
    split = split_documents(docs)
    names = {s: [d.name for d in ds] for s, ds in split.items()}
    all_names = [n for ns in names.values() for n in ns]
    assert sorted(all_names) == sorted(d.name for d in docs), "every document in exactly one split"
    for s in ("valid", "test"):
        folders = {n.split("/")[0] for n in names[s]}
        assert folders == {"books", "speeches"}, f"{s} holds documents of every folder"
    again = split_documents(list(reversed(load_corpus(tmp_path))))
    assert {s: [d.name for d in ds] for s, ds in again.items()} == names


def test_long_documents_are_cut_into_contiguous_blocks(tmp_path: Path) -> None:
    lines = [f"line {i} " + "word " * 20 for i in range(500)]
    (tmp_path / "book.txt").write_text("\n\n".join(lines) + "\n")  # paragraphs
    (tmp_path / "short.txt").write_text("short text\n")
    blocks = cut_blocks(load_corpus(tmp_path), block_words=2000)
    names = [b.name for b in blocks]
    assert names[-1] == "short.txt" and len(names) > 3
    assert "".join(b.text for b in blocks if b.name.startswith("book.txt#")) == load_corpus(tmp_path)[0].text


# The Brown corpus layout: 500 documents of about 2,000 words in 15 genre folders of 6 to 80.
BROWN_GENRES = dict(zip("ABCDEFGHJKLMNPR", (44, 27, 17, 17, 36, 48, 75, 30, 80, 29, 24, 6, 29, 29, 9), strict=True))


def test_every_folder_of_many_holds_out_its_share() -> None:
    docs = [
        Document(f"{genre}/c{genre.lower()}{i:02d}", "word " * (1800 + 97 * ((i * 7 + ord(genre)) % 9)))
        for genre, count in BROWN_GENRES.items()
        for i in range(count)
    ]
    split = split_documents(docs)
    words = {d.name: len(d.text.split()) for d in docs}
    for genre, count in BROWN_GENRES.items():
        in_genre = {d.name for d in docs if d.name.startswith(f"{genre}/")}
        total, largest = sum(words[n] for n in in_genre), max(words[n] for n in in_genre)
        for s in ("valid", "test"):
            held = sum(words[d.name] for d in split[s] if d.name in in_genre)
            # Dealt until the share is reached: at least 10%, over by less than one document.
            assert 0.1 * total <= held < 0.1 * total + largest, (genre, count, s)
        assert any(d.name in in_genre for d in split["train"])
    # Overall, each split is over its share by less than one document per folder.
    all_words = sum(words.values())
    for s in ("valid", "test"):
        share = sum(words[d.name] for d in split[s]) / all_words
        assert 0.1 <= share < 0.1 + 15 * max(words.values()) / all_words, (s, share)


def test_the_bundled_corpus_splits_as_the_bundled_models_card_records() -> None:
    card, _ = read_model_dir(BUNDLED_MODELS / "pd-english" / "1")
    block_words = card.training["train"]["block_words"]
    split = split_documents(cut_blocks(load_corpus(DEFAULT_CORPUS), block_words))
    assert {s: len(ds) for s, ds in split.items()} == card.training["split"]
    assert {s: sum(len(d.words) for d in ds) for s, ds in split.items()} == card.training["tokens"]
