"""``lstmd type``: next-word suggestions that update as you type, over one stream.

The server does the suggesting: after each finished word the next words (the feed's prediction),
after each key of a word the words that begin with what is typed (a prefix-only feed, which applies
nothing). The text reaches the session a word at a time, in the shape the server's completion
assumes, a new word after the text fed: the whitespace after a word is held back and fed with the
next word (" clouds"), never on its own (a trailing space tokenizes badly in subword models, and a
character model needs the space fed before the word after it).
"""

from __future__ import annotations

import contextlib
import sys
import termios
import tty
from collections.abc import Iterator

from lstmd.client._sync import Client, Stream
from lstmd.client._types import Candidate

HELP = "Type text. Suggestions complete the word being typed; Tab takes the first one. Ctrl-D or Esc quits."
_WORD_CHARS = "'-"  # inside a word, after its first letter or digit
_MAX_PREFIX = 64  # the longest word_prefix the server completes


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in _WORD_CHARS


def ready(unfed: str, growing: bool = True) -> int:
    """How much of ``unfed`` (typed, not yet fed) can be fed now: all but what waits for the next
    word: the word at its end (letters and digits, with apostrophes and hyphens after the first)
    and the whitespace before it, or the whitespace after the last word. Unless ``growing`` (more
    keys may follow), an apostrophe or hyphen at the end ends no word: it is fed as punctuation."""
    if not growing and unfed.endswith(tuple(_WORD_CHARS)):
        return len(unfed)
    i = len(unfed)
    while i and _is_word_char(unfed[i - 1]):
        i -= 1
    while i < len(unfed) and not unfed[i].isalnum():  # a word starts with a letter or digit
        i += 1
    while i and unfed[i - 1].isspace():
        i -= 1
    return i


class Typist:
    """What has been typed (``text``), how much of it the session was fed (``fed``), and the
    suggestions: the next words after the text fed, or the completions of the word being typed."""

    def __init__(self, stream: Stream, top_k: int, exclude_special: bool = True, starts_from_zeros: bool = False):
        self.stream, self.top_k, self.exclude_special = stream, top_k, exclude_special
        self.can_complete = not starts_from_zeros  # a zero-start session has nothing to complete from until fed
        self.text, self.fed = "", 0
        self.next_words: list[Candidate] = []  # the prediction of the last feed
        self.suggestions: list[Candidate] = []

    @property
    def word(self) -> str:
        """The word being typed ("" between words)."""
        unfed = self.text[self.fed :]
        return unfed[ready(unfed) :].lstrip()

    def type(self, keys: str, growing: bool = True) -> None:
        """Append ``keys`` to the text and feed what of it is ready (see ``ready``), in one feed."""
        self.text += keys
        unfed = self.text[self.fed :]
        n = ready(unfed, growing)
        if n:
            prediction = self.stream.feed(unfed[:n], self.top_k, exclude_special=self.exclude_special)
            self.next_words, self.fed = prediction.candidates, self.fed + n

    def refresh(self) -> None:
        """The suggestions for the text as it is: the server's completions of the word being typed
        (none before anything was fed on a model that starts from zeros: its session has nothing to
        complete from, and refuses), or the next words."""
        word = self.word
        if not word:
            self.suggestions = self.next_words
        elif (self.fed or self.can_complete) and len(word) <= _MAX_PREFIX:
            self.suggestions = self.stream.complete(word, self.top_k, self.exclude_special).candidates
        else:
            self.suggestions = []

    def backspace(self) -> None:
        """Delete the last key not fed yet (what was fed stays), unless the next key would then
        join a word already fed."""
        unfed = self.text[self.fed :]
        joins = len(unfed) == 1 and self.fed > 0 and _is_word_char(self.text[self.fed - 1])
        if unfed and not joins:
            self.text = self.text[:-1]

    def take(self) -> None:
        """Tab: type the rest of the first suggestion, and a space after it."""
        if not self.suggestions:
            return
        best, word = self.suggestions[0], self.word
        if word:
            rest = best.word[len(word) :]
        elif self.text[self.fed :]:  # after whitespace typed
            rest = best.word
        else:  # right after the text fed: with the candidate's own spacing
            rest = best.text or best.word
        self.type(rest + " ")

    def key(self, char: str) -> bool:
        """Handle one key; False to quit."""
        if char in ("\x04", "\x1b"):
            return False
        if char in ("\x7f", "\b"):
            self.backspace()
        elif char == "\t":
            self.take()
        elif char in ("\r", "\n"):
            self.type("\n")
        elif char.isprintable():
            self.type(char)
        else:
            return True
        self.refresh()
        return True

    def shown(self) -> str:
        return "  ".join(f"{c.word} {c.probability:.0%}" for c in self.suggestions)

    def render(self) -> str:
        line = self.text.rsplit("\n", 1)[-1][-60:]
        shown = self.shown()
        return f"\r\033[K{line}\033[2m  [{shown}]\033[0m" if shown else f"\r\033[K{line}"


def run_interactive(client: Client, model: str, top_k: int, exclude_special: bool = True) -> int:
    info = next((m for m in client.list_models() if m.name == model or (not model and m.is_default)), None)
    with client.open_stream(model=model) as stream:
        typist = Typist(stream, top_k, exclude_special, starts_from_zeros=info is not None and info.starts_from_zeros)
        if not sys.stdin.isatty():  # piped input: the suggestions at the end of each line
            line_end = ""  # fed with the next line's text, as whitespace typed is
            for line in sys.stdin:
                text = line.rstrip("\r\n")
                typist.type(line_end + text, growing=False)
                typist.refresh()
                print(typist.shown(), flush=True)
                line_end = line[len(text) :]
            return 0
        print(HELP)
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
