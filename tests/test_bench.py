"""The benchmark harness, CI-sized: it must run end to end so it cannot rot. Its figures are
not checked (they are measurements, not behaviour); what is checked is that every system was
measured by the load generator (bench/loadgen, which needs ``npm ci --prefix bench/loadgen``),
without errors, and that the results, tables and plots were written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_python_m_bench_quick_measures_every_system(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("compute ceiling", "transport ceiling", "combined ceiling", "lstmd", "naive"):
        rows = results["systems"][name]
        assert [row["streams"] for row in rows] == [1, 8], name
        assert all(row["tokens_per_s"] > 0 for row in rows), name
    for name in ("transport ceiling", "lstmd", "naive"):
        for row in results["systems"][name]:
            assert row["errors"] == {} and row["tokens"] > 0, (name, row)
            assert row["server_cpu_s_per_1k_tokens"] > 0 and row["client_cpu_cores"] > 0, (name, row)
    for name in ("transport ceiling (multi-session)", "lstmd multi-session"):  # one FeedMany stream
        rows = results["systems"][name]
        assert [row["sessions_per_message"] for row in rows] == [1, 8], (name, rows)
        for row in rows:
            assert row["errors"] == {} and row["tokens"] == row["messages"] * row["sessions_per_message"] > 0, row
            assert row["server_cpu_s_per_1k_tokens"] > 0 and row["client_cpu_cores"] > 0, (name, row)
    torchserve = results["systems"]["TorchServe"]
    if (ROOT / ".venv-torchserve").exists():  # CI sets it up (bash bench/torchserve/setup.sh)
        assert [row["streams"] for row in torchserve] == [1, 8], torchserve
        assert all(row["errors"] == {} and row["tokens_per_s"] > 0 and row["client_cpu_cores"] > 0
                   for row in torchserve), torchserve  # fmt: skip
    else:
        assert "not set up" in torchserve, torchserve
    assert results["prompt"]["speedup"] > 0
    assert [row["sessions"] for row in results["idle_sessions"]["rows"]] == [100, 1000]
    assert results["int8"]["fp32"]["perplexity"] > 1 and results["int8"]["int8"]["perplexity"] > 1
    table = (tmp_path / "results.md").read_text()
    assert "### Targets" in table and "| lstmd |" in table and "| lstmd multi-session |" in table
    assert "### Load generator CPU (cores)" in table and "load generator < 0.5 core at every point" in table
    for plot in ("throughput.png", "latency.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
