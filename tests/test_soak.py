"""The CI-sized soak: bench/soak.py for 45 s at 64 streams against a server process (streams,
sessions and connections opened and closed all the time), with the server's RSS and open file
descriptors sampled every second. After 15 s of warm-up they must not grow by more than 16 MB and
8 descriptors, and no call may fail. People run the long one: ``python bench/soak.py --minutes 30``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_RSS_GROWTH_MB, MAX_FD_GROWTH = 16, 8


@pytest.mark.slow
def test_soak_64_streams_no_errors_and_no_growth_after_warm_up(
    models_dir: Path, figures: Callable[[str], None]
) -> None:
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "45", "--streams", "64",
               "--warmup-s", "15", "--max-rss-growth-mb", str(MAX_RSS_GROWTH_MB),
               "--max-fd-growth", str(MAX_FD_GROWTH),
               "--models-dir", str(models_dir), "--json"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["feeds"] > 10_000 and result["streams_opened"] > 64 and result["reconnects"] >= 16
    assert result["errors"] == {}, result["summary"]
    assert result["rss_growth_mb"] <= MAX_RSS_GROWTH_MB and result["fd_growth"] <= MAX_FD_GROWTH, result["summary"]
    assert result["ok"] and run.returncode == 0
    figures(f"{result['summary']} (bounds: {MAX_RSS_GROWTH_MB} MB, {MAX_FD_GROWTH} fds)")
