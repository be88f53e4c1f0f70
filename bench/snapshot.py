"""How long the session snapshot takes, and how long it holds up the event loop.

    python bench/snapshot.py [--sessions 10000] [--dir DIR]

Fills a session store with ``--sessions`` sessions of the bundled model (each with an
exactly-once record of five candidates), then writes the snapshot the way the server does
every ``--snapshot-interval-s`` (the loop gathers references, a thread encodes and fsyncs)
while a task on the loop ticks every millisecond: the longest gap between ticks is how long
the write held up other work. Then restores it into an empty store, as at start.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from lstmd.server.engine import Candidate, Prediction, Token
from lstmd.server.memory_store import MemorySessionStore
from lstmd.server.registry import load_models
from lstmd.server.settings import Settings
from lstmd.server.snapshot_policy import FILE_NAME, Snapshots


async def measure(sessions: int, folder: Path) -> None:
    settings = Settings(snapshot_dir=str(folder), max_sessions=sessions)
    registry = load_models(settings)
    model = registry.get("")
    store = MemorySessionStore(sessions, "evict", 3600)
    for i in range(sessions):
        session = await store.create(model, 5, owner="")
        session.position = i
        answer = Prediction(
            session.id, i, [Token(3, "the", False)], [Candidate("sea", 9, 0.019, "word", " sea", [9])] * 5, []
        )
        session.last_request = ((i - 1, (3,), 5, False, "", False, False), answer)
    snapshots = Snapshots(settings, store, registry)

    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.get_running_loop().create_task(tick())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    assert await snapshots.write(final=False)
    written = time.perf_counter() - started
    ticker.cancel()
    size = (folder / FILE_NAME).stat().st_size

    started = time.perf_counter()
    restored = Snapshots(settings, MemorySessionStore(sessions, "evict", 3600), registry).restore()
    restore_s = time.perf_counter() - started
    print(f"{sessions} sessions of {model.name} ({2 * model.card.state_bytes} bytes of state each): "
          f"snapshot {size / 1e6:.1f} MB written in {written:.2f} s, longest event-loop stall "
          f"{max(gaps) * 1000:.0f} ms; {restored} restored in {restore_s:.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, help="folder for the snapshot (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(measure(args.sessions, args.dir or Path(tmp)))


if __name__ == "__main__":
    main()
