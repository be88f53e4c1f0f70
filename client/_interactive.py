"""``lstmd type``: next-word suggestions that update as you type, over one stream."""

from __future__ import annotations

import contextlib
import sys
import termios
import tty
from collections.abc import Iterator

from lstmd.client._sync import Client, Stream
from lstmd.client._types import Candidate

HELP = "Type text. Suggestions update after each word; Tab takes the first one. Ctrl-D or Esc quits."
_WORD_CHARS = "'-"
_CANDIDATES = 100  # asked for, so suggestions can be filtered by the word being typed


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class Typist:
    """What has been typed, the word in progress, and the latest suggestions."""

    def __init__(self, stream: Stream, top_k: int, candidates: int):
        self.stream, self.top_k, self.asked = stream, top_k, candidates
        self.text, self.word = "", ""
        self.candidates: list[Candidate] = []

    def commit(self, extra: str = "") -> None:
        """Send the word in progress (and punctuation or a newline) to the server."""
        piece = self.word + extra
        self.word = ""
        if piece.strip() or piece == "\n":
            self.candidates = self.stream.feed(piece, top_k=self.asked).candidates

    def suggestions(self) -> list[Candidate]:
        return [c for c in self.candidates if c.word.startswith(self.word.lower())][: self.top_k]

    def key(self, char: str) -> bool:
        """Handle one key; False to quit."""
        if char in ("\x04", "\x1b"):
            return False
        if char in ("\x7f", "\b"):
            if self.word:
                self.word, self.text = self.word[:-1], self.text[:-1]
        elif char == "\t":
            best = self.suggestions()
            if best:
                completion = best[0].word[len(self.word) :]
                self.text += completion + " "
                self.word += completion
                self.commit()
        elif char.isalnum() or (char in _WORD_CHARS and self.word):
            self.word += char
            self.text += char
        elif char in ("\r", "\n"):
            self.commit("\n")
            self.text += "\n"
        elif char == " ":
            self.commit()
            self.text += " "
        elif char.isprintable():
            self.commit(char)
            self.text += char
        return True

    def render(self) -> str:
        line = self.text.rsplit("\n", 1)[-1][-60:]
        shown = "  ".join(f"{c.word} {c.probability:.0%}" for c in self.suggestions())
        return f"\r\033[K{line}\033[2m  [{shown}]\033[0m" if shown else f"\r\033[K{line}"


def run_interactive(client: Client, model: str, top_k: int) -> int:
    vocab = next((m.vocab_size for m in client.list_models() if m.name == model or (not model and m.is_default)), 0)
    print(HELP)
    with client.open_stream(model=model) as stream:
        typist = Typist(stream, top_k, min(_CANDIDATES, vocab or _CANDIDATES))
        if not sys.stdin.isatty():  # piped input: suggestions after each line
            for line in sys.stdin:
                typist.commit(line)
                print("  ".join(f"{c.word} {c.probability:.0%}" for c in typist.suggestions()))
            return 0
        with _cbreak(sys.stdin.fileno()):
            while True:
                sys.stdout.write(typist.render())
                sys.stdout.flush()
                char = sys.stdin.read(1)
                if not char or not typist.key(char):
                    break
                if char in ("\r", "\n"):
                    sys.stdout.write("\n")
    print()
    return 0
