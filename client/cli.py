"""``lstmd``: the command-line client (also ``python -m lstmd.client``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from lstmd.client._args import add_connection_arguments, client_options
from lstmd.client._errors import LstmdError
from lstmd.client._sync import Client
from lstmd.client._types import GeneratedToken, Input, ModelInfo, Prediction, SamplingOptions
from lstmd.client.bench import add_bench_arguments, run_bench
from lstmd.model.tokenizer import detokenize


def _client(args: argparse.Namespace) -> Client:
    return Client(**client_options(args))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table; columns of numbers are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(isinstance(row[i], int | float) or str(row[i])[:1].isdigit() for row in rows)
               for i in range(len(headers))]  # fmt: skip
    lines = ["  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True))
             for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _prediction_json(p: Prediction) -> dict[str, object]:
    return {
        "position": p.position,
        "tokens": [{"id": t.id, "word": t.word, "unknown": t.unknown} for t in p.tokens],
        "candidates": [dataclasses.asdict(c) for c in p.candidates],  # word, kind, text, token_ids, ...
    }


def _token_id(value: str) -> int:
    try:
        token_id = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids are integers (--ids 3 227 179 6), not {value!r}") from None
    if not -(2**63) <= token_id < 2**63:
        raise argparse.ArgumentTypeError(f"token id {value} is out of range")
    return token_id


def _add_input(p: argparse.ArgumentParser, name: str, help: str, required: bool = True) -> None:
    """The command's input: ``name`` (text), or ``--ids`` (token ids of the model's vocabulary)."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument(name, nargs="?", help=help)
    group.add_argument("--ids", nargs="+", type=_token_id, metavar="ID",
                       help=f"token ids instead of {name}, separated by spaces (e.g. --ids 3 227 179 6); "
                       "`lstmd tokenize` shows a text's ids")  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> int:
    data: Input = args.ids if args.ids is not None else (args.text or "")
    if not data and not args.prefix:
        print("lstmd predict: one of the arguments text --ids --prefix is required", file=sys.stderr)
        return 2
    with _client(args) as client, client.open_stream(args.session, args.model, args.top_k) as stream:
        prediction = stream.feed(data, word_prefix=args.prefix, tokens=args.tokens, exclude_special=not args.special)
    if args.json:
        print(json.dumps(_prediction_json(prediction)))
        return 0
    unknown = [t.word for t in prediction.tokens if t.unknown]
    if unknown:
        print(f"(not in the vocabulary, read as <unk>: {', '.join(unknown)})")
    rows = [(i, c.word, f"{c.probability:.1%}") for i, c in enumerate(prediction.candidates, start=1)]
    print(table(["rank", "next token" if args.tokens else "next word", "probability"], rows))
    return 0


def _show_generated(client: Client, tokens: Iterable[GeneratedToken]) -> None:
    """Print each token's text as it comes: the server's decoding (``text``, which may be "" while a
    character spans tokens). A server older than that field, known by its ModelInfo without a
    tokenizer, sends no text: then lstmd's word joining of the pieces, as if after a word."""
    if any(m.tokenizer for m in client.list_models()):
        for token in tokens:
            print(token.text, end="", flush=True)
        return
    words: list[str] = []
    shown = ""
    for token in tokens:
        words.append(token.word)
        text = detokenize(["x", *words])[1:]
        print(text[len(shown) :], end="", flush=True)
        shown = text


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = SamplingOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, stop=args.stop)  # fmt: skip
    with _client(args) as client:
        if args.ids is None:
            print(args.prompt, end="", flush=True)
            _show_generated(client, client.generate(args.prompt, session_id=args.session, model=args.model,
                                                    **sampling))  # fmt: skip
        else:  # Generate takes a text prompt only: the ids are fed to the session first
            with contextlib.ExitStack() as temporary:
                session = (client.get_session(args.session) if args.session
                           else temporary.enter_context(client.create_session(args.model)))  # fmt: skip
                session.feed(args.ids)
                _show_generated(client, session.generate(**sampling))
    print()
    return 0


def _whole_lines(text: str) -> list[str]:
    """``text`` in pieces of whole lines, each with something besides whitespace (blank lines go
    with the line after them, trailing ones with the last), so that the model's tokenizer sees
    exactly the text, blank lines and all, and no piece is empty."""
    pieces: list[str] = []
    pending = ""
    for line in text.splitlines(keepends=True):
        pending += line
        if line.strip():
            pieces.append(pending)
            pending = ""
    if pieces and pending:
        pieces[-1] += pending
    return pieces


def cmd_score(args: argparse.Namespace) -> int:
    """Perplexity over the tokens that have a prediction: all of them, except the first on a model
    that starts from a zero state (it has nothing before it; the server sends no log-probability)."""
    inputs: list[Input]
    if args.ids is not None:
        inputs = [args.ids]
    else:
        try:
            text = Path(args.file).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            print(f"lstmd: {args.file}: {e.strerror}", file=sys.stderr)
            return 1
        inputs = list(_whole_lines(text))
    total, count, unknown, fed = 0.0, 0, 0, 0
    with _client(args) as client:
        # token candidates, one: scoring reads the log-probabilities and pays for no word search
        for prediction in client.stream(inputs, model=args.model, top_k=1, token_logprobs=True, tokens=True):
            total += sum(prediction.token_logprobs)
            count += len(prediction.token_logprobs)
            fed += len(prediction.tokens)
            unknown += sum(t.unknown for t in prediction.tokens)
    if not count:
        if fed:  # one token on a model that starts from zeros
            print("lstmd: nothing to score: the one token has no prediction before it", file=sys.stderr)
        else:
            print(f"lstmd: {args.file} holds no words", file=sys.stderr)
        return 1
    result = {
        "tokens": count,
        "unknown": unknown,
        "perplexity": math.exp(-total / count),
        "mean_logprob": total / count,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(table(["tokens", "unknown words", "perplexity"],
                    [(count, f"{unknown} ({unknown / count:.1%})", f"{result['perplexity']:.1f}")]))  # fmt: skip
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], default=_iso))
    else:
        print(_models_table(models))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    names = [name for name, _ in args.pin] + args.unpin
    if twice := sorted({name for name in names if names.count(name) > 1}):
        print(f"lstmd reload: error: {', '.join(twice)} pinned or unpinned more than once", file=sys.stderr)
        return 2
    pins = dict(args.pin) | dict.fromkeys(args.unpin, "")
    with _client(args) as client:
        reload = client.reload_models(pins)
    if args.json:
        print(json.dumps(dataclasses.asdict(reload), default=_iso))
        return 0
    print(f"loaded: {', '.join(reload.loaded) or 'nothing new'}; draining: {', '.join(reload.draining) or 'none'}")
    print(_models_table(reload.models))
    return 0


def _iso(t: datetime) -> str:
    """A ModelInfo's unload_at in JSON: ISO 8601."""
    return t.isoformat()


def _pin(text: str) -> tuple[str, str]:
    name, equals, version = text.partition("=")
    if not (name and equals and version):
        raise argparse.ArgumentTypeError(f"expected NAME=VERSION (such as tiny=2), got {text!r}")
    return name, version


def _models_table(models: list[ModelInfo]) -> str:
    rows = [(m.name + (" (default)" if m.is_default else ""), m.version, _version_state(m),
             f"{m.unload_at:%Y-%m-%dT%H:%M:%SZ}" if m.unload_at else "-", m.sessions, m.tokenizer or "?",
             m.vocab_size, m.num_layers, m.hidden_size, m.state_bytes, m.precision, f"{m.test_perplexity:.1f}")
            for m in models]  # fmt: skip
    return table(["model", "version", "state", "unloads", "sessions", "tokenizer", "words", "layers", "hidden",
                  "state bytes", "precision", "test ppl"], rows)  # fmt: skip


def _version_state(m: ModelInfo) -> str:
    """What a loaded version does: serves new sessions, or drains (kept for its own until they end)."""
    return "draining" if m.draining else "serving" if m.serving else "loaded"


def _visible(piece: str) -> str:
    """A piece as a table shows it: quoted when it is empty or holds spaces or unprintable characters."""
    return piece if piece and piece.isprintable() and " " not in piece else repr(piece)


def cmd_tokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.tokenize(args.text, args.model)
    if args.json:
        tokens = [{"id": t.id, "piece": t.word, "unknown": t.unknown} for t in result.tokens]
        print(json.dumps({"model": result.model, "tokenizer": result.tokenizer, "tokens": tokens}))
        return 0
    print(f"{result.model}: {result.tokenizer} tokenizer, {len(result.tokens)} tokens")
    rows = [(i, t.id, _visible(t.word), "yes" if t.unknown else "") for i, t in enumerate(result.tokens)]
    print(table(["position", "id", "piece", "unknown"], rows))
    return 0


def cmd_type(args: argparse.Namespace) -> int:
    from lstmd.client._interactive import run_interactive

    with _client(args) as client:
        return run_interactive(client, args.model, args.top_k, exclude_special=not args.special)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstmd", description="Talk to an lstmd server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: object, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_connection_arguments(p)
        p.set_defaults(func=func)
        return p

    p = command("predict", cmd_predict, "the most likely next words after a text (or words that begin with --prefix)")
    _add_input(p, "text", "the text (may be left out with --prefix: then nothing is fed)", required=False)
    p.add_argument("--prefix", default="", metavar="WORD",
                   help="the typed start of the next word: the words that begin with it (it is not fed)")  # fmt: skip
    p.add_argument("--session", default="", help="continue this session (default: a new, temporary one)")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--top-k", type=int, default=5, help="how many words")
    p.add_argument("--tokens", action="store_true",
                   help="the model's next tokens instead of whole words (subword models: pieces of words)")  # fmt: skip
    p.add_argument("--special", action="store_true", help="include special tokens (<unk>, <eos>, ...)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("type", cmd_type, "interactive: next-word suggestions update as you type")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--top-k", type=int, default=5, help="how many suggestions")
    p.add_argument("--special", action="store_true", help="include special tokens (<unk>, <eos>, ...)")

    p = command("generate", cmd_generate, "continue a text by sampling, word by word "
                "(with --ids: the ids are fed first and only the continuation is printed)")  # fmt: skip
    _add_input(p, "prompt", "the text to continue")
    p.add_argument("--session", default="", help="continue this session (default: a new, temporary one)")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely words (0: all)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", help="stop after this word (repeatable)")

    p = command("score", cmd_score, "perplexity of a text file (or of token ids) under a served model")
    _add_input(p, "file", "a UTF-8 text file; each non-empty line is fed with its line end")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("tokenize", cmd_tokenize, "how a model splits a text into tokens and ids (steps no session)")
    p.add_argument("text")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("health", cmd_health, "ask the gRPC health service (exit 0 when SERVING)")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")

    p = command("models", cmd_models, "list the served models")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("reload", cmd_reload, "load new model version folders; new sessions go to each model's newest "
                "version or the pinned one, the others drain; with Redis on every replica (an admin call: "
                "LSTMD_ADMIN_KEYS)")  # fmt: skip
    p.add_argument("--pin", action="append", type=_pin, default=[], metavar="NAME=VERSION",
                   help="serve this version of the model to new sessions, until the server restarts "
                   "(LSTMD_MODEL_VERSIONS keeps a pin across restarts; repeatable)")  # fmt: skip
    p.add_argument("--unpin", action="append", default=[], metavar="NAME",
                   help="serve the model's newest version again (repeatable)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(timeout=300.0)  # the server answers once the new versions are loaded

    add_bench_arguments(command("bench", run_bench, "load generator: concurrent streams, per-token latency"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LstmdError as e:
        print(f"lstmd: {e.code}: {e.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
