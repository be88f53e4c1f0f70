"""lstmd-server from two checkouts, side by side under the same load: did a change help?

    git worktree add /tmp/lstmd-old <commit>
    python -m bench.versions /tmp/lstmd-old [--new .] [--streams 1,64] [--seconds 8] [--rounds 4]

Each checkout's server runs with its own code and its own bundled model (this
venv's packages), alternately, for ``--rounds`` rounds (each round in the other order: on this
machine whichever server runs second in a round measured about 6% more CPU per token at 64
streams, whatever its code), driven by this checkout's
load generator (bench/loadgen). Prints the medians of tokens/s, p50 and p99 per token and server CPU per
token, and the new/old ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import _process


def measure(root: Path, streams: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    # The package layout (``lstmd.server`` from proto/lstmd), or the top-level ``server`` before it.
    new_layout = (root / "proto" / "lstmd" / "server").exists()
    module, path = ("lstmd.server", root / "proto") if new_layout else ("server", root)
    command = [sys.executable, "-m", module, "--models-dir", str(root / "server" / "models"), "--host",
               "127.0.0.1", "--port", "0", "--metrics-port", "-1"]  # fmt: skip
    with _process.serve(command, _process.LSTMD_READY, cwd=str(root), env={"PYTHONPATH": str(path)}) as server:
        return {n: _process.load(server, n, seconds) for n in streams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="checkout of the old version")
    parser.add_argument("--new", type=Path, default=Path("."), help="checkout of the new version")
    parser.add_argument("--streams", default="1,64")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4, help="an even number cancels the order's effect")
    args = parser.parse_args()
    streams = [int(n) for n in args.streams.split(",")]
    runs: dict[str, list[dict[int, dict[str, Any]]]] = {"old": [], "new": []}
    for i in range(args.rounds):
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            runs[name].append(measure(getattr(args, name).resolve(), streams, args.seconds))

    def value(report: dict[str, Any], figure: str) -> float:
        if figure == "tokens/s":
            return float(report["tokens_per_s"])
        if figure in ("p50", "p99"):
            return float(report["latency_ms"][figure])
        return 1000 * float(report["server_cpu_s_per_1k_tokens"])

    def median(name: str, n: int, figure: str) -> float:
        return statistics.median(value(run[n], figure) for run in runs[name])

    print(f"medians of {args.rounds} rounds, {args.seconds:g} s each")
    print(f"{'streams':>7}  {'figure':<22}{'old':>10}{'new':>10}{'new/old':>9}")
    for n in streams:
        for figure, label in (("tokens/s", "tokens/s"), ("p50", "p50 ms per token"), ("p99", "p99 ms per token"),
                              ("cpu", "server CPU us/token")):  # fmt: skip
            old, new = median("old", n, figure), median("new", n, figure)
            print(f"{n:>7}  {label:<22}{old:>10,.2f}{new:>10,.2f}{new / old:>9.2f}")


if __name__ == "__main__":
    main()
