"""lstmd against its ceilings and its peers, on the bundled model, in one run.

    npm ci --prefix bench/loadgen   # once: the load generator's packages (Node.js 18+)
    python -m bench [--out docs/benchmarks] [--seconds 8] [--quick] [--no-torchserve]

Measures, one after another on this machine:
- compute ceiling: ONNX Runtime in this process stepping batches of 1, 8, 64, 256 sequences
  with carried state (the server's model settings, no gRPC);
- transport ceiling: ``bench/echo_server.py`` (bare grpc.aio, lstmd-sized replies, no model);
- lstmd-server, the naive server (``bench/naive_server.py``) and TorchServe
  (``bench/torchserve``, when set up) at 1, 8, 64 and 256 concurrent streams, one token per
  message;
- the multi-session path: one FeedMany stream of 1, 8, 64 and 256 sessions per message, to the
  echo server (its transport ceiling) and to lstmd-server;
- lstmd in prompt mode (200-token prompts) against 200 single-token feeds;
- lstmd-server's RSS with 1k, 10k and 100k idle sessions;
- the int8 model against fp32: perplexity on the test split and tokens/s at 64 streams.

Every served system is driven by the same closed-loop load generator, ``bench/loadgen`` (Node.js,
@grpc/grpc-js: Python's grpc.aio client was the limit before the servers were), which reports its
own CPU; a figure measured while it used half a core or more is marked as possibly bounded by it.

Writes ``results.json``, ``results.md`` (the tables and the targets) and two plots
(``throughput.png``, ``latency.png``) to ``--out``, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench import _process
from bench.idle_sessions import idle_sessions
from lstmd.model import graph
from lstmd.model.folder import ONNX_FILE
from lstmd.server.registry import load_models
from lstmd.server.settings import BUNDLED_MODELS, Settings

MODEL = "pd-english"
STREAMS = [1, 8, 64, 256]  # concurrent streams, and sessions per message on the multi-session path
MULTI = ["transport ceiling (multi-session)", "lstmd multi-session"]  # one FeedMany stream
SYSTEMS = ["compute ceiling", "transport ceiling", "combined ceiling", "lstmd", "naive", "TorchServe", *MULTI]
BOUND_CORES = 0.5  # the load generator's CPU from which a figure may be its limit rather than the server's
BOUND = f"† the load generator used >= {BOUND_CORES} core here: the figure may be bounded by it, not by the server"


def level(name: str, row: dict[str, Any]) -> int:
    """A row's column: its concurrent streams, or its sessions per message on the multi-session path."""
    return int(row["sessions_per_message"] if name in MULTI else row["streams"])


def bounded(row: dict[str, Any]) -> bool:
    return float(row.get("client_cpu_cores", 0.0)) >= BOUND_CORES


def compute_ceiling(session: Any, layers: int, hidden: int, vocab: int, batch: int, seconds: float) -> dict[str, Any]:
    """ONNX Runtime alone: steps of ``batch`` sequences, state carried, for about ``seconds``."""
    h = c = np.zeros((layers, batch, hidden), np.float32)
    rng = np.random.default_rng(0)

    def step(h: np.ndarray, c: np.ndarray) -> graph.Outputs:  # what the server asks for a step
        return graph.run(session, rng.integers(2, vocab, (batch, 1)), h, c, 1, with_logprobs=False)

    for _ in range(5):  # warm-up
        step(h, c)
    times: list[float] = []
    cpu, deadline = time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 20:
        started = time.perf_counter()
        out = step(h, c)
        h, c = out.h, out.c
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    ms = np.array(times) * 1000
    return {
        "streams": batch,
        "tokens_per_s": batch / float(np.median(times)),
        "latency_ms": {"p50": float(np.median(ms)), "p99": float(np.percentile(ms, 99))},
        "cpu_s_per_1k_tokens": 1000 * cpu / (batch * len(times)),
    }


def compute_ceilings(models_dir: str, streams: list[int], seconds: float) -> dict[str, list[dict[str, Any]]]:
    """With the server's ONNX Runtime settings (one intra-op thread, no spinning) and with ONNX
    Runtime's defaults (a spinning thread per core: faster alone, but it takes the cores gRPC
    needs); the ceiling is the faster of the two at each batch size."""
    model = load_models(Settings(models_dir=models_dir)).get(MODEL)
    defaults = graph.load(model.folder / ONNX_FILE)
    sessions = {"server settings": model.session, "ONNX Runtime defaults": defaults}
    return {
        name: [compute_ceiling(session, model.layers, model.hidden, model.vocab_size, n, seconds) for n in streams]
        for name, session in sessions.items()
    }


def served(command: list[str], ready: str, streams: list[int], seconds: float) -> list[dict[str, Any]]:
    """Each number of concurrent Stream calls, one token per message (each point warms up first)."""
    with _process.serve(command, ready) as server:
        return [_process.load(server, n, seconds) for n in streams]


def multi_session(command: list[str], ready: str, sessions: list[int], seconds: float) -> list[dict[str, Any]] | str:
    """One FeedMany stream at each number of sessions per message; or why there are no figures."""
    with _process.serve(command, ready) as server:
        rows = [_process.load(server, 1, seconds, sessions_per_message=m) for m in sessions]
    if all(row["tokens"] == 0 and set(row["errors"]) == {"UNIMPLEMENTED"} for row in rows):
        return "not measured: this server answers FeedMany UNIMPLEMENTED"
    return rows


def torchserve(streams: list[int], seconds: float) -> list[dict[str, Any]] | str:
    """TorchServe's figures, or why there are none."""
    if not Path(".venv-torchserve/bin/torchserve").exists():
        return "not set up: run bash bench/torchserve/setup.sh"
    command = [sys.executable, "-m", "bench.torchserve.run", "--streams", ",".join(map(str, streams)),
               "--duration", str(seconds), "--json"]  # fmt: skip
    # bench.torchserve.run drives TorchServe with bench/loadgen too (--mode torchserve)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return f"failed ({done.returncode}): {done.stderr.strip()[-1000:]}"
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def prompt_mode(models_dir: str, seconds: float) -> dict[str, Any]:
    """One stream: 200-token prompts in one feed against 200 one-token feeds; and 8 streams of prompts."""
    with _process.serve(_process.lstmd_server(models_dir), _process.LSTMD_READY) as server:
        single = _process.load(server, 1, seconds)
        prompt = _process.load(server, 1, seconds, prompt_tokens=200)
        many = _process.load(server, 8, seconds, prompt_tokens=200)
    return {
        "single_token_feed_ms_p50": single["latency_ms"]["p50"],
        "prompt_200_ms_p50": prompt["latency_ms"]["p50"],
        "speedup": 200 * single["latency_ms"]["p50"] / prompt["latency_ms"]["p50"],
        "prompt_1_stream": prompt,
        "prompt_8_streams": many,
    }


def int8_against_fp32(models_dir: str, seconds: float, test_tokens: int) -> dict[str, Any]:
    """Quantize the bundled model, then perplexity on the test split and tokens/s at 64 streams."""
    from lstmd.export.cli import DEFAULT_CORPUS
    from lstmd.export.corpus import cut_blocks, load_corpus, split_documents
    from lstmd.export.quantize import quantize_model_dir
    from lstmd.export.verify import ort_perplexity

    src = Path(models_dir) / MODEL / "1"
    model = load_models(Settings(models_dir=models_dir)).get(MODEL)
    test = split_documents(cut_blocks(load_corpus(DEFAULT_CORPUS), 20_000))["test"]
    ids = [i for doc in test for i in model.vocab.encode(doc.words)][:test_tokens]
    result: dict[str, Any] = {"test_tokens": len(ids)}
    with tempfile.TemporaryDirectory() as tmp:
        int8_root = Path(tmp) / "models"
        quantize_model_dir(src, int8_root / MODEL / "1", ids[:2000])
        for precision, root in (("fp32", models_dir), ("int8", str(int8_root))):
            session = graph.load(Path(root) / MODEL / "1" / ONNX_FILE, threads=1)
            perplexity = ort_perplexity(session, ids, model.layers, model.hidden)
            with _process.serve(_process.lstmd_server(root), _process.LSTMD_READY) as server:
                run = _process.load(server, 64, seconds)
            result[precision] = {"perplexity": perplexity, "tokens_per_s_64": run["tokens_per_s"], "run": run}
    result["speedup"] = result["int8"]["tokens_per_s_64"] / result["fp32"]["tokens_per_s_64"]
    result["perplexity_increase"] = result["int8"]["perplexity"] / result["fp32"]["perplexity"] - 1
    return result


def combined(compute: dict[str, Any], transport: dict[str, Any]) -> dict[str, Any]:
    """The ceiling for a Python gRPC server: transport and compute paid one after the other."""
    rate = 1 / (1 / compute["tokens_per_s"] + 1 / transport["tokens_per_s"])
    p99 = compute["latency_ms"]["p99"] + transport["latency_ms"]["p99"]
    # as bounded by the load generator as the transport figure it comes from
    return {"streams": compute["streams"], "tokens_per_s": rate, "latency_ms": {"p99": p99},
            "client_cpu_cores": transport["client_cpu_cores"]}  # fmt: skip


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets: (target, measured, holds). Those whose points were not measured (a
    --quick run, a system not set up) are left out."""
    lists = {name: rows for name, rows in r["systems"].items() if isinstance(rows, list)}
    at = {name: {level(name, row): row for row in rows} for name, rows in lists.items()}
    out: list[tuple[str, str, bool]] = []
    lstmd, compute, transport = at["lstmd"], at["compute ceiling"], at["transport ceiling"]
    multi, ts = at.get("lstmd multi-session", {}), at.get("TorchServe", {})
    points = [(f"{name} at {n}", row["client_cpu_cores"]) for name, rows in at.items() if name != "combined ceiling"
              for n, row in rows.items() if "client_cpu_cores" in row]  # fmt: skip
    points += [("prompt mode, 1 stream", r["prompt"]["prompt_1_stream"]["client_cpu_cores"]),
               ("prompt mode, 8 streams", r["prompt"]["prompt_8_streams"]["client_cpu_cores"])]  # fmt: skip
    points += [(f"{p} at 64", r["int8"][p]["run"]["client_cpu_cores"]) for p in ("fp32", "int8")]
    where, most = max(points, key=lambda point: point[1])
    out.append((f"load generator < {BOUND_CORES} core at every point", f"at most {most:.2f} cores ({where})",
                most < BOUND_CORES))  # fmt: skip
    for n in (64, 256):
        if n in lstmd:
            ratio = lstmd[n]["tokens_per_s"] / at["combined ceiling"][n]["tokens_per_s"]
            out.append((f"{n} streams: lstmd >= 0.6 x combined ceiling", f"{ratio:.2f} x", ratio >= 0.6))
    for n in (64, 256):
        if n in lstmd:
            cpu, echo, ort = (x[n].get("server_cpu_s_per_1k_tokens", x[n].get("cpu_s_per_1k_tokens"))
                              for x in (lstmd, transport, compute))  # fmt: skip
            out.append((f"{n} streams: lstmd server CPU per token <= 1.5 x (echo server + compute ceiling)",
                        f"{cpu:.3f} vs 1.5 x ({echo:.3f} + {ort:.3f}) CPU ms", cpu <= 1.5 * (echo + ort)))  # fmt: skip
    for n in (64, 256):
        if n in multi:
            ratio = multi[n]["tokens_per_s"] / compute[n]["tokens_per_s"]
            out.append((f"{n} sessions per message: lstmd multi-session >= 0.6 x compute ceiling at batch {n}",
                        f"{ratio:.2f} x", ratio >= 0.6))  # fmt: skip
    for n, times in ((64, 2.0), (256, 1.5)):
        if n in lstmd and n in ts:
            ratio = lstmd[n]["tokens_per_s"] / ts[n]["tokens_per_s"]
            p99, ts_p99 = lstmd[n]["latency_ms"]["p99"], ts[n]["latency_ms"]["p99"]
            holds = ratio >= times and p99 <= ts_p99
            out.append((f"{n} streams: >= {times:g} x TorchServe tokens/s, p99 no worse",
                        f"{ratio:.2f} x, p99 {p99:.1f} vs {ts_p99:.1f} ms", holds))  # fmt: skip
    for n in (64, 256):
        if n in multi and n in ts:
            ratio = multi[n]["tokens_per_s"] / ts[n]["tokens_per_s"]
            out.append((f"{n} sessions per message: lstmd multi-session >= 4 x TorchServe at {n} streams",
                        f"{ratio:.2f} x", ratio >= 4))  # fmt: skip
    one, echo_one, ort_one = (x[1]["latency_ms"]["p50"] for x in (lstmd, transport, compute))
    out.append(("1 stream: lstmd p50 <= echo p50 + compute ceiling batch-1 p50 + 0.1 ms",
                f"{one:.3f} vs {echo_one:.3f} + {ort_one:.3f} + 0.1 ms", one <= echo_one + ort_one + 0.1))  # fmt: skip
    idle = {row["sessions"]: row for row in r["idle_sessions"]["rows"]}
    biggest = max(idle)
    out.append((f"{biggest:,} idle sessions in <= 1 GiB RSS", f"{idle[biggest]['rss_mib']:,.0f} MiB",
                idle[biggest]["rss_mib"] <= 1024))  # fmt: skip
    speedup = r["prompt"]["speedup"]
    out.append(("200-token prompt in one feed >= 5 x faster than 200 feeds", f"{speedup:.1f} x", speedup >= 5))
    q = r["int8"]
    out.append(("int8: >= 1.3 x tokens/s at 64 streams, <= 3% perplexity increase",
                f"{q['speedup']:.2f} x, {100 * q['perplexity_increase']:+.2f}% perplexity",
                q["speedup"] >= 1.3 and q["perplexity_increase"] <= 0.03))  # fmt: skip
    return out


def tables(r: dict[str, Any]) -> str:
    streams = r["streams"]
    head = "| system | " + " | ".join(map(str, streams)) + " |"
    rule = "|---|" + "---:|" * len(streams)

    def table(title: str, names: list[str], cell: Any) -> list[str]:
        """A table of ``cell(row)`` by system and column, a figure the load generator may have bounded marked."""
        lines, marked = ["", f"### {title}", "", head, rule], False
        for name in names:
            rows = r["systems"].get(name)
            by = {level(name, x): x for x in rows} if isinstance(rows, list) else {}
            cells = []
            for n in streams:
                cells.append("n/a" if n not in by or cell(by[n]) is None else cell(by[n]) + " †" * bounded(by[n]))
                marked |= cells[-1].endswith("†")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return lines + (["", BOUND] if marked else [])

    def cpu(x: dict[str, Any]) -> str | None:
        value = x.get("server_cpu_s_per_1k_tokens", x.get("cpu_s_per_1k_tokens"))
        return None if value is None else f"{value:.3f}"

    served = [name for name in SYSTEMS if name not in ("compute ceiling", "combined ceiling")]
    lines = ["Columns: concurrent Stream calls (one session each, one token per message); on the multi-session "
             "rows, sessions per FeedMany message on one stream. Latency is per message."]  # fmt: skip
    lines += table("Tokens per second", SYSTEMS, lambda x: f"{x['tokens_per_s']:,.0f}")
    lines += table("p99 latency per message (ms)", SYSTEMS, lambda x: f"{x['latency_ms']['p99']:.2f}")
    lines += table("p50 latency per message (ms)", [n for n in SYSTEMS if n != "combined ceiling"],
                   lambda x: f"{x['latency_ms']['p50']:.2f}")  # fmt: skip
    lines += table("Server CPU seconds per 1,000 tokens", [n for n in SYSTEMS if n != "combined ceiling"], cpu)
    lines += table("Load generator CPU (cores)", served, lambda x: f"{x['client_cpu_cores']:.2f}")
    lines += ["", "### Compute ceiling by ONNX Runtime settings (tokens/s; CPU seconds per 1,000 tokens)", ""]
    lines += ["| settings | " + " | ".join(f"{n}" for n in streams) + " |", "|---|" + "---:|" * len(streams)]
    for name, rows in r["compute"].items():
        cells = [f"{x['tokens_per_s']:,.0f}; {x['cpu_s_per_1k_tokens']:.3f}" for x in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Where the server's CPU goes (microseconds per token, by thread)",
        "",
        "| system | thread | " + " | ".join(f"{n}" for n in streams) + " |",
        "|---|---|" + "---:|" * len(streams),
    ]
    for name in ("transport ceiling", "lstmd", *MULTI):
        if not isinstance(r["systems"].get(name), list):
            continue
        by = {level(name, x): x["server_cpu_us_per_token_by_thread"] for x in r["systems"][name]}
        for kind in by[streams[0]]:
            lines.append(f"| {name} | {kind} | " + " | ".join(f"{by[n][kind]:,.0f}" for n in streams) + " |")
    for name, rows in r["systems"].items():
        if isinstance(rows, str):
            lines += ["", f"{name}: {rows}"]
    p = r["prompt"]
    lines += ["", "### Prompt mode (lstmd)", "",
              f"- one stream: a 200-token prompt in one feed takes {p['prompt_200_ms_p50']:.2f} ms (median); "
              f"200 one-token feeds take 200 x {p['single_token_feed_ms_p50']:.3f} ms: {p['speedup']:.1f} x faster",
              f"- 8 streams of 200-token prompts: {p['prompt_8_streams']['tokens_per_s']:,.0f} tokens/s"]  # fmt: skip
    idle = r["idle_sessions"]
    lines += ["", "### Idle sessions (lstmd)", "", f"state_bytes per session: {idle['state_bytes']:,}; "
              f"RSS after start-up {idle['rss_after_start_mib']:.0f} MiB", "",
              "| sessions | RSS MiB | growth MiB | bytes per session |", "|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {x['sessions']:,} | {x['rss_mib']:,.0f} | {x['growth_mib']:,.0f} | {x['bytes_per_session']:,.0f} |"
              for x in idle["rows"]]  # fmt: skip
    q = r["int8"]
    lines += ["", f"### int8 against fp32 (perplexity on {q['test_tokens']:,} test tokens; lstmd at 64 streams)", "",
              "| precision | perplexity | tokens/s |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {p} | {q[p]['perplexity']:.2f} | {q[p]['tokens_per_s_64']:,.0f}{' †' * bounded(q[p]['run'])} |"
              for p in ("fp32", "int8")]  # fmt: skip
    lines += ["", "### Targets", "", "| target | measured | holds |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(r)]
    return "\n".join(lines)


def plots(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, filename in (("tokens_per_s", "tokens/s", "throughput.png"),
                                  ("p99", "p99 latency per message (ms)", "latency.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in SYSTEMS:
            rows = r["systems"].get(name)
            if not isinstance(rows, list):
                continue
            xs = [level(name, x) for x in rows]
            ys = [x["tokens_per_s"] if key == "tokens_per_s" else x["latency_ms"]["p99"] for x in rows]
            style = "--" if "ceiling" in name else "-"
            ax.plot(xs, ys, style, marker="s" if name in MULTI else "o", label=name)
            for x, y, row in zip(xs, ys, rows, strict=True):
                if bounded(row):
                    ax.annotate("†", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(r["streams"], [str(n) for n in r["streams"]])
        ax.set_xlabel("concurrent streams (one token per message), or sessions per message (multi-session)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs. load ({r['machine']}); † load generator >= {BOUND_CORES} core", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks", help="folder for results.json, results.md and plots")
    parser.add_argument("--models-dir", default=str(BUNDLED_MODELS))
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per measured point")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: 1 and 8 streams and sessions per message, 1 s each, small counts")  # fmt: skip
    parser.add_argument("--no-torchserve", action="store_true", help="skip TorchServe")
    args = parser.parse_args()
    _process.check_loadgen()
    streams = [1, 8] if args.quick else STREAMS
    seconds = 1.0 if args.quick else args.seconds
    idle_counts = [100, 1000] if args.quick else [1000, 10_000, 100_000]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    r: dict[str, Any] = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {platform.system()}",
        "streams": streams,
        "seconds_per_point": seconds,
        "load_generator": "bench/loadgen (Node.js, @grpc/grpc-js), 1 s of warm-up before each point",
        "systems": {},
    }

    def step(what: str) -> None:
        print(f"[{time.time() - started:5.0f} s] {what}", file=sys.stderr, flush=True)

    systems = r["systems"]
    step("compute ceiling: ONNX Runtime in process")
    r["compute"] = compute_ceilings(args.models_dir, streams, seconds)
    rows = zip(*r["compute"].values(), strict=True)
    systems["compute ceiling"] = [max(same_batch, key=lambda x: x["tokens_per_s"]) for same_batch in rows]
    step("transport ceiling: bare grpc.aio echo server")
    echo = [sys.executable, "-m", "bench.echo_server", "--port", "0"]
    systems["transport ceiling"] = served(echo, _process.BENCH_READY, streams, seconds)
    pairs = zip(systems["compute ceiling"], systems["transport ceiling"], strict=True)
    systems["combined ceiling"] = [combined(c, t) for c, t in pairs]
    step("lstmd-server")
    lstmd = _process.lstmd_server(args.models_dir)
    systems["lstmd"] = served(lstmd, _process.LSTMD_READY, streams, seconds)
    step("naive server")
    naive = [sys.executable, "-m", "bench.naive_server", "--port", "0"]
    systems["naive"] = served(naive, _process.BENCH_READY, streams, seconds)
    step("multi-session: one FeedMany stream, to the echo server and to lstmd-server")
    systems["transport ceiling (multi-session)"] = multi_session(echo, _process.BENCH_READY, streams, seconds)
    systems["lstmd multi-session"] = multi_session(lstmd, _process.LSTMD_READY, streams, seconds)
    if args.no_torchserve:
        systems["TorchServe"] = "skipped (--no-torchserve)"
    else:
        step("TorchServe")
        systems["TorchServe"] = torchserve(streams, seconds)
    step("prompt mode")
    r["prompt"] = prompt_mode(args.models_dir, seconds)
    step(f"idle sessions: {', '.join(map(str, idle_counts))}")
    r["idle_sessions"] = asdict(idle_sessions(idle_counts, args.models_dir))
    step("int8 against fp32")
    r["int8"] = int8_against_fp32(args.models_dir, seconds, 5_000 if args.quick else 200_000)
    r["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    text = tables(r)
    (out / "results.md").write_text(text + "\n")
    plots(r, out)
    step(f"wrote {out}/results.json, results.md, throughput.png, latency.png")
    print(text)


if __name__ == "__main__":
    main()
