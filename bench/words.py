"""What whole-word candidates cost, how often the beam finds the words a much wider search finds,
and how long a completion of the word being typed takes under load.

    python -m bench.words --models DIR [--sample 200] [--seconds 8] [--wide-beam 128]

DIR holds served models (one sub-folder each, as ``lstmd-server --models-dir`` reads it); every
one is measured, so put the bundled word model beside a character and a subword model (the
commands that trained ours are in docs/words.md). Texts come from the bundled corpus's test
split, cut as training cuts it. lstmd-server runs as a process on this machine; figures are
medians.

1. Cost: one word fed at a time to one session, asking for token candidates and for word
   candidates in alternating rounds: milliseconds per feed, the server's CPU per feed, their
   ratio, and the tokens the model ran per feed (a feed of one token: 1).
2. Recall: at ``--sample`` word boundaries of the test split (the 30 words before as context),
   the top 5 words of the default beam (``LSTMD_WORD_BEAM`` 8) against those of a second server
   with ``--wide-beam``, with and without the first letter of the true next word as the typed
   prefix; and how often the true next word is in each top 5.
3. Completion latency: 1 and 64 sessions at once, each typing words of the test split letter by
   letter (a prefix-only feed per letter): completions per second, median and p99 milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from bench import _process
from bench.cluster import free_port
from lstmd.export.cli import DEFAULT_CORPUS
from lstmd.export.corpus import cut_blocks, load_corpus, split_documents
from lstmd.v1 import lstmd_pb2 as pb
from lstmd.v1 import lstmd_pb2_grpc

CONTEXT_WORDS = 30
TOP = 5
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


def test_words() -> list[str]:
    """The bundled corpus's test split (as training cuts and splits it), lowercased, as words."""
    docs = split_documents(cut_blocks(load_corpus(DEFAULT_CORPUS), 20_000))["test"]
    return _WORD.findall(" ".join(d.text for d in docs).lower())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name) and labels in line)


def _server(models: str, metrics_port: int, *flags: str) -> Any:
    command = _process.lstmd_server(models, *flags)
    command[command.index("--metrics-port") + 1] = str(metrics_port)
    return _process.serve(command, _process.LSTMD_READY)


async def cost(stub: Any, model: str, words: list[str], rounds: int, feeds: int, server: _process.Server,
               metrics_port: int) -> dict[str, Any]:  # fmt: skip
    """Milliseconds, server CPU and ONNX Runtime rows per one-word feed, tokens against words."""
    times: dict[str, list[float]] = {"tokens": [], "words": []}
    cpu: dict[str, float] = {"tokens": 0.0, "words": 0.0}
    rows: dict[str, float] = {"tokens": 0.0, "words": 0.0}
    label = f'model="{model}"'
    for r in range(rounds):
        for mode in ("tokens", "words") if r % 2 == 0 else ("words", "tokens"):
            session = await stub.CreateSession(pb.CreateSessionRequest(model=model))
            kind = pb.CANDIDATE_KIND_TOKEN if mode == "tokens" else pb.CANDIDATE_KIND_WORD
            start = r * feeds
            await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" ".join(words[start : start + 20])))
            before_cpu, before_rows = server.cpu_seconds(), _metric(metrics_port, "lstmd_tokens_total", label)
            for word in words[start + 20 : start + 20 + feeds]:
                t = time.perf_counter()
                await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" " + word, candidates=kind,
                                               exclude_special=True))  # fmt: skip
                times[mode].append(time.perf_counter() - t)
            cpu[mode] += server.cpu_seconds() - before_cpu
            rows[mode] += _metric(metrics_port, "lstmd_tokens_total", label) - before_rows
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id))
    n = rounds * feeds  # feeds of each mode: every round runs both
    out = {f"{mode}_ms": 1000 * statistics.median(times[mode]) for mode in times}
    out |= {f"{mode}_cpu_ms": 1000 * cpu[mode] / n for mode in cpu}
    out |= {f"{mode}_rows": rows[mode] / n for mode in rows}
    out["ratio_ms"] = out["words_ms"] / out["tokens_ms"]
    # a CI-sized run's token feeds may use less CPU than the clock's tick: no ratio then (NaN, "nan")
    out["ratio_cpu"] = out["words_cpu_ms"] / out["tokens_cpu_ms"] if out["tokens_cpu_ms"] else float("nan")
    return out


async def top_words(stub: Any, model: str, context: str, prefix: str) -> list[str]:
    session = await stub.CreateSession(pb.CreateSessionRequest(model=model))
    got = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=context, word_prefix=prefix, top_k=TOP,
                                         exclude_special=True))  # fmt: skip
    await stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id))
    return [c.word for c in got.candidates]


async def recall(stubs: tuple[Any, Any], model: str, positions: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for typed in (False, True):
        overlap, hits, wide_hits = [], 0, 0
        for context, target in positions:
            prefix = target[0] if typed else ""
            beam, wide = [await top_words(s, model, context, prefix) for s in stubs]
            overlap.append(len(set(beam) & set(wide)) / max(len(wide), 1))
            hits += target in beam
            wide_hits += target in wide
        key = "completion" if typed else "next_word"
        out[key] = {"recall_at_5": statistics.mean(overlap), "true_word_in_top5": hits / len(positions),
                    "true_word_in_wide_top5": wide_hits / len(positions)}  # fmt: skip
    return out


async def completion_latency(
    target: str, model: str, words: list[str], sessions: int, seconds: float
) -> dict[str, Any]:
    """``sessions`` sessions at once, each typing words letter by letter: a prefix-only feed per
    letter, then the word fed with its space."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = lstmd_pb2_grpc.LstmdStub(channel)

        async def typist(n: int) -> None:
            session = await stub.CreateSession(pb.CreateSessionRequest(model=model))
            start = (n * 997) % (len(words) - 1000)
            await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" ".join(words[start : start + 20])))
            for word in words[start + 20 :]:
                for i in range(1, len(word) + 1):
                    if time.perf_counter() > deadline:
                        return
                    t = time.perf_counter()
                    await stub.Feed(pb.FeedRequest(session_id=session.session_id, word_prefix=word[:i], top_k=TOP,
                                                   exclude_special=True))  # fmt: skip
                    latencies.append(time.perf_counter() - t)
                await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=" " + word,
                                               candidates=pb.CANDIDATE_KIND_TOKEN, top_k=1))  # fmt: skip

        await asyncio.gather(*(typist(n) for n in range(sessions)))
    return {"sessions": sessions, "completions_per_s": len(latencies) / seconds,
            "median_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * _percentile(latencies, 0.99)}  # fmt: skip


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    words = test_words()
    rng = random.Random(0)
    picks = sorted(rng.sample(range(CONTEXT_WORDS, len(words)), args.sample))
    positions = [(" ".join(words[i - CONTEXT_WORDS : i]), words[i]) for i in picks]
    models = sorted(p.name for p in Path(args.models).iterdir() if p.is_dir() and not p.name.startswith("."))
    report: dict[str, Any] = {"models": {}}
    metrics_port = free_port()
    with (
        _server(args.models, metrics_port) as server,
        _server(args.models, -1, "--word-beam", str(args.wide_beam)) as wide,
    ):
        async with grpc.aio.insecure_channel(server.target) as a, grpc.aio.insecure_channel(wide.target) as b:
            stubs = (lstmd_pb2_grpc.LstmdStub(a), lstmd_pb2_grpc.LstmdStub(b))
            listed = {m.name: m.tokenizer for m in (await stubs[0].ListModels(pb.ListModelsRequest())).models}
            for model in models:
                print(f"{model} ({listed[model]}): cost", flush=True)
                entry: dict[str, Any] = {"tokenizer": listed[model]}
                entry["cost"] = await cost(stubs[0], model, words, args.rounds, args.feeds, server, metrics_port)
                print(f"{model}: recall over {args.sample} positions", flush=True)
                entry["recall"] = await recall(stubs, model, positions)
                report["models"][model] = entry
        for model in models:
            print(f"{model}: completion latency", flush=True)
            report["models"][model]["latency"] = [
                await completion_latency(server.target, model, words, n, args.seconds) for n in (1, 64)
            ]
    return report


def markdown(report: dict[str, Any], wide_beam: int) -> str:
    lines = ["| model | tokenizer | token step ms | word candidates ms | ratio | server CPU ms, tokens / words | ratio "
             "| tokens run per feed, tokens / words |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in report["models"].items():
        c = m["cost"]
        lines.append(f"| {name} | {m['tokenizer']} | {c['tokens_ms']:.2f} | {c['words_ms']:.2f} | {c['ratio_ms']:.2f} "
                     f"| {c['tokens_cpu_ms']:.2f} / {c['words_cpu_ms']:.2f} | {c['ratio_cpu']:.2f} "
                     f"| {c['tokens_rows']:.1f} / {c['words_rows']:.1f} |")  # fmt: skip
    lines += ["", f"| model | top-5 recall of beam 8 against beam {wide_beam}: next word | completion of its first "
              "letter | true next word in top 5, beam 8 / wide | completion, beam 8 / wide |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in report["models"].items():
        nw, co = m["recall"]["next_word"], m["recall"]["completion"]
        lines.append(f"| {name} | {nw['recall_at_5']:.3f} | {co['recall_at_5']:.3f} "
                     f"| {nw['true_word_in_top5']:.3f} / {nw['true_word_in_wide_top5']:.3f} "
                     f"| {co['true_word_in_top5']:.3f} / {co['true_word_in_wide_top5']:.3f} |")  # fmt: skip
    lines += ["", "| model | sessions | completions/s | median ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for name, m in report["models"].items():
        for row in m["latency"]:
            lines.append(f"| {name} | {row['sessions']} | {row['completions_per_s']:.0f} | {row['median_ms']:.2f} "
                         f"| {row['p99_ms']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="models folder: every model in it is measured")
    parser.add_argument("--sample", type=int, default=200, help="word boundaries of the test split for recall")
    parser.add_argument("--wide-beam", type=int, default=128, help="the much wider search's beam")
    parser.add_argument("--rounds", type=int, default=6, help="cost: rounds, token and word modes alternating")
    parser.add_argument("--feeds", type=int, default=100, help="cost: one-word feeds a round")
    parser.add_argument("--seconds", type=float, default=8.0, help="completion latency: seconds a load")
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report, args.wide_beam))


if __name__ == "__main__":
    main()
