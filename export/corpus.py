"""Corpus loading and the document-level train/validation/test split.

Files may be plain text or gzipped (``.gz``), in UTF-8, Windows-1252 or ISO-8859-1, with LF
or CRLF line ends. Hard-wrapped lines of a paragraph are joined, so each paragraph (or verse
line, where lines are short) becomes one line of text and ends with ``<eos>`` once tokenized.

The split is by document, stratified by top-level folder. Long documents (whole books)
are first cut into contiguous blocks of about ``block_words`` words at paragraph
boundaries, named ``path#k``, so that one novel cannot make up the whole test set. Inside
each folder the documents (or blocks) are ordered by a hash of their name and dealt out to
test, then validation, until each holds its share of words; the rest is training data.
The result depends only on the files, never on the machine, and is recorded in the model
card. A split given as three files (``read_split_file``) is used as is instead.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from lstmd.model.tokenizer import tokenize

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root, without ".gz"
    text: str

    @property
    def words(self) -> list[str]:
        return tokenize(self.text)


def decode_bytes(data: bytes) -> str:
    """Decode UTF-8 if it is valid, else Windows-1252, else ISO-8859-1 (never fails)."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def unwrap(text: str) -> str:
    """Join hard-wrapped lines: blank lines separate paragraphs; lines inside a paragraph
    are joined with a space. Short lines (verse, headings) are kept as their own lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    for paragraph in text.split("\n\n"):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        # Prose wrapped at a fixed width has most lines long; verse has most lines short.
        long_lines = sum(len(line) >= 50 for line in lines)
        if len(lines) > 1 and long_lines * 2 >= len(lines):
            out.append(" ".join(lines))
        else:
            out.extend(lines)
    return "\n".join(out) + "\n"


def read_text(path: Path) -> str:
    """A file's text as written: gunzipped if it ends in ``.gz``, decoded as ``decode_bytes`` does."""
    data = path.read_bytes()
    return decode_bytes(gzip.decompress(data) if path.suffix == ".gz" else data)


def read_document(path: Path, root: Path) -> Document:
    name = path.relative_to(root).as_posix().removesuffix(".gz")
    return Document(name=name, text=unwrap(read_text(path)))


def read_split_file(path: str | Path) -> Document:
    """One file of a fixed split (``--split``), used as is: decoded and with LF line ends, but
    lines are never joined, so a pre-tokenized corpus keeps one ``<eos>`` per line."""
    path = Path(path)
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    return Document(name=path.name.removesuffix(".gz"), text=text)


def load_corpus(root: str | Path) -> list[Document]:
    """Every ``.txt`` / ``.txt.gz`` file under ``root`` (or ``root`` itself), sorted by name."""
    root = Path(root)
    if root.is_file():
        return [read_document(root, root.parent)]
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
    if not paths:
        raise FileNotFoundError(f"no .txt or .txt.gz files under {root}")
    return [read_document(p, root) for p in paths]


def cut_blocks(docs: list[Document], block_words: int) -> list[Document]:
    """Cut documents much longer than ``block_words`` into contiguous blocks of whole lines."""
    out: list[Document] = []
    for doc in docs:
        total = len(doc.text.split())
        if total <= block_words * 1.5:
            out.append(doc)
            continue
        per_block = total / round(total / block_words)
        blocks: list[str] = []
        block: list[str] = []
        words = 0
        for line in doc.text.splitlines(keepends=True):
            block.append(line)
            words += len(line.split())
            if words >= per_block * (len(blocks) + 1):
                blocks.append("".join(block))
                block = []
        if block:
            blocks.append("".join(block))
        out.extend(Document(f"{doc.name}#{i}", text) for i, text in enumerate(blocks))
    return out


def _order_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def split_documents(
    docs: list[Document], valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, list[Document]]:
    """Assign whole documents (or blocks) to splits. Returns {split: [documents]}.

    Each folder of three or more documents gives test, then validation, at least its share of
    the folder's words (overshooting by less than one document) and keeps one document or more
    for training; folders of fewer documents go to training whole."""
    groups: dict[str, list[Document]] = {}
    for doc in docs:
        groups.setdefault(doc.name.split("/")[0] if "/" in doc.name else "", []).append(doc)
    split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for group in groups.values():
        if len(group) < 3:  # too few documents to hold any out: all train
            split["train"].extend(group)
            continue
        sizes = {d.name: len(d.text.split()) for d in group}
        total = sum(sizes.values())
        ordered = sorted(group, key=lambda d: _order_key(d.name))
        targets = [("test", test_fraction * total), ("valid", valid_fraction * total)]
        filled = {"test": 0, "valid": 0}
        held = 0  # this folder's documents held out so far: at least one must stay for training
        for doc in ordered:
            for name, target in targets:
                if filled[name] < target and len(ordered) - held > 1:
                    split[name].append(doc)
                    filled[name] += sizes[doc.name]
                    held += 1
                    break
            else:
                split["train"].append(doc)
    return {s: sorted(ds, key=lambda d: d.name) for s, ds in split.items()}
