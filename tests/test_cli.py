"""The ``lstmd`` command line against a real server process, as a user runs it."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from lstmd.client import Client
from tests.conftest import WORDS, Reference

ID = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}  # the tiny models' vocabulary

LSTMD = shutil.which("lstmd", path=str(Path(sys.executable).parent)) or "lstmd"


def lstmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([LSTMD, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_predict_table_and_json(server_target: str) -> None:
    out = lstmd("predict", "the cat sat on the", "--target", server_target, "--top-k", "3").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "next", "word", "probability"] and len(lines) == 5
    data = json.loads(lstmd("predict", "the cat sat on the", "--target", server_target, "--json").stdout)
    assert len(data["candidates"]) == 5 and lines[2].split()[1] == data["candidates"][0]["word"]
    assert data["candidates"] == sorted(data["candidates"], key=lambda c: -c["probability"])
    data = json.loads(lstmd("predict", "the cat zyzzyva", "--target", server_target, "--json").stdout)
    assert data["position"] == 3 and data["tokens"][2] == {"id": 0, "word": "zyzzyva", "unknown": True}


def test_generate_streams_reproducible_text(server_target: str) -> None:
    args = (
        "generate",
        "the king",
        "--target",
        server_target,
        "--max-tokens",
        "12",
        "--seed",
        "1",
        "--temperature",
        "0.8",
    )
    first, second = lstmd(*args).stdout, lstmd(*args).stdout
    assert first == second and first.startswith("the king") and len(first.split()) >= 8


def test_score_is_the_perplexity_of_exactly_the_text(server_target: str, tmp_path: Path, reference: Reference) -> None:
    """Blank lines included: the model sees the text as its tokenizer makes it, each newline "<eos>"."""
    text = "the cat sat on the mat .\n\nthe dog ran to the river .\n\n"
    (tmp_path / "text.txt").write_text(text)
    data = json.loads(lstmd("score", str(tmp_path / "text.txt"), "--target", server_target, "--json").stdout)
    vocab = ["<unk>", "<eos>", *WORDS]  # the tiny model's vocabulary (tests/conftest.py)
    words = [w for line in text.split("\n")[:-1] for w in [*line.split(), "<eos>"]]
    ids = [vocab.index(w) for w in words]
    # ONNX Runtime on the model file: each token's log-probability after the ones before it
    total = sum(float(reference.logprobs(ids[:i])[token]) for i, token in enumerate(ids))
    assert data["tokens"] == len(ids) == 18 and data["unknown"] == 0
    assert math.isclose(data["perplexity"], math.exp(-total / len(ids)), rel_tol=1e-5)


def test_score_matches_the_library(server_target: str, tmp_path: Path) -> None:
    text = "the cat sat on the mat .\nthe dog ran to the river .\n"
    (tmp_path / "text.txt").write_text(text)
    data = json.loads(lstmd("score", str(tmp_path / "text.txt"), "--target", server_target, "--json").stdout)
    assert data["tokens"] == 16 and data["unknown"] == 0  # 7 tokens and "<eos>" per line
    with Client(server_target) as c, c.create_session() as session:
        total = sum(sum(session.feed(line + "\n", token_logprobs=True).token_logprobs) for line in text.splitlines())
    assert math.isclose(data["perplexity"], math.exp(-total / 16), rel_tol=1e-5)


def test_health_and_models(server_target: str) -> None:
    assert lstmd("health", "--target", server_target).stdout.strip() == f"{server_target}: SERVING"
    models = lstmd("models", "--target", server_target).stdout
    assert "tiny (default)" in models and "tiny2" in models
    header, _, *rows = models.splitlines()
    assert header.split()[:5] == ["model", "version", "state", "unloads", "sessions"]
    assert [r.split()[-7] for r in rows] == ["words"] * 2  # the tokenizer
    for row in rows:
        state, unloads, sessions = row.split()[-10:-7]
        assert state == "serving" and unloads == "-" and sessions.isdigit()
    assert {m["name"] for m in json.loads(lstmd("models", "--json", "--target", server_target).stdout)} == {
        "tiny",
        "tiny2",
    }


def test_ids_give_what_the_same_text_gives(server_target: str, tmp_path: Path) -> None:
    ids = [str(ID[w]) for w in ("the", "cat", "sat", "on", "the")]
    by_text = json.loads(lstmd("predict", "the cat sat on the", "--json", "--target", server_target).stdout)
    by_ids = json.loads(lstmd("predict", "--ids", *ids, "--json", "--target", server_target).stdout)
    assert by_ids == by_text and by_ids["position"] == 5
    table_text = lstmd("predict", "the cat sat on the", "--target", server_target).stdout
    assert lstmd("predict", "--ids", *ids, "--target", server_target).stdout == table_text

    sampling = ("--max-tokens", "12", "--seed", "1", "--temperature", "0.8", "--target", server_target)
    generated = lstmd("generate", "the king", *sampling).stdout
    continued = lstmd("generate", "--ids", str(ID["the"]), str(ID["king"]), *sampling).stdout
    assert generated == "the king" + continued and len(continued.split()) >= 8

    (tmp_path / "text.txt").write_text("the cat sat on the mat .\n")
    line = [str(ID[w]) for w in ("the", "cat", "sat", "on", "the", "mat", ".", "<eos>")]
    scored = json.loads(lstmd("score", str(tmp_path / "text.txt"), "--json", "--target", server_target).stdout)
    scored_ids = json.loads(lstmd("score", "--ids", *line, "--json", "--target", server_target).stdout)
    assert scored_ids["tokens"] == scored["tokens"] == 8
    assert math.isclose(scored_ids["perplexity"], scored["perplexity"], rel_tol=1e-6)


@pytest.mark.parametrize("command", ["predict", "generate", "score"])
def test_bad_ids_are_the_servers_invalid_argument_or_a_usage_error(server_target: str, command: str) -> None:
    result = lstmd(command, "--ids", "3", "999", "--target", server_target, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "lstmd: INVALID_ARGUMENT: token id 999 is outside the vocabulary of tiny" in result.stderr
    for args, message in ((["--ids", "3", "x"], "token ids are integers"), (["--ids", str(2**63)], "out of range"),
                          (["the", "--ids", "3"], "not allowed with"), ([], "is required")):  # fmt: skip
        result = lstmd(command, *args, "--target", server_target, check=False)
        assert result.returncode == 2 and message in result.stderr


def test_tokenize_table_and_json(server_target: str) -> None:
    out = lstmd("tokenize", "The cat zyzzyva.\nsat", "--target", server_target).stdout.splitlines()
    assert out[0] == "tiny: words tokenizer, 6 tokens"
    assert out[1].split() == ["position", "id", "piece", "unknown"]
    assert [line.split() for line in out[3:]] == [
        ["0", str(ID["the"]), "the"],
        ["1", str(ID["cat"]), "cat"],
        ["2", str(ID["<unk>"]), "zyzzyva", "yes"],
        ["3", str(ID["."]), "."],
        ["4", str(ID["<eos>"]), "<eos>"],
        ["5", str(ID["sat"]), "sat"],
    ]
    data = json.loads(lstmd("tokenize", "a sea", "--model", "tiny2", "--json", "--target", server_target).stdout)
    tokens = [{"id": ID["a"], "piece": "a", "unknown": False}, {"id": ID["sea"], "piece": "sea", "unknown": False}]
    assert data == {"model": "tiny2", "tokenizer": "words", "tokens": tokens}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["health", "--target", "127.0.0.1:1", "--timeout", "2"], 1, "UNAVAILABLE"),
        (["predict", "the", "--session", "0" * 32], 1, "NOT_FOUND: session 000"),
        (["predict", "the", "--top-k", "many"], 2, "invalid int value"),
        (["generate", "the", "--max-tokens", "0"], 1, "INVALID_ARGUMENT: max_tokens"),
        (["tokenize", ""], 1, "INVALID_ARGUMENT: the input is empty"),
        (["tokenize", "the", "--model", "nope"], 1, "NOT_FOUND: no model named 'nope'"),
        (["score", "no-such-file.txt"], 1, "lstmd: no-such-file.txt: No such file or directory"),
        (["models", "--tls-cert-file", "client.pem"], 2, "--tls-cert-file and --tls-key-file go together"),
    ],
)
def test_errors_exit_non_zero_with_a_message(server_target: str, args: list[str], code: int, message: str) -> None:
    if "--target" not in args:
        args = [*args, "--target", server_target]
    result = lstmd(*args, check=False)
    assert result.returncode == code and message in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_json_figures_add_up(server_target: str) -> None:
    result = lstmd("bench", "--target", server_target, "--streams", "64", "--tokens", "20", "--json", "--quiet")
    report = json.loads(result.stdout)
    assert report["feeds"] == 64 * 20 == report["tokens"] and report["errors"] == {}
    assert report["tokens_per_s"] > 0 and 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    prompts = json.loads(lstmd("bench", "--target", server_target, "--streams", "4", "--tokens", "3",
                               "--prompt-tokens", "50", "--processes", "2", "--json", "--quiet").stdout)  # fmt: skip
    assert prompts["tokens"] == 4 * 3 * 50 and prompts["feeds"] == 12 and prompts["processes"] == 2


def test_type_interactively_in_a_pseudo_terminal(server_target: str) -> None:
    child = pexpect.spawn(LSTMD, ["type", "--target", server_target, "--top-k", "3"], encoding="utf-8", timeout=20)
    try:
        child.expect("Ctrl-D or Esc quits")
        child.send("the ")
        child.expect(r"the \x1b\[2m  \[(\S+) \d+%")  # suggestions after the first word
        child.send("cat s")
        child.expect(r"cat s\x1b\[2m  \[([^\]]*)\]")  # the server's completions of "s"
        assert isinstance(child.match, re.Match)
        words = [pair.rsplit(" ", 1)[0] for pair in child.match.group(1).split("  ")]
        assert len(words) == 3 and all(w.startswith("s") for w in words)
        assert not {"<unk>", "<eos>"} & set(words)
        child.send("x\x7f\x7f\x7f")  # backspace deletes what was not fed yet, never "cat"
        child.expect(r"the cat \x1b\[2m")
        child.send("s\t")
        child.expect(rf"the cat {words[0]} \x1b\[2m")  # Tab took the first suggestion, and a space
        child.send("\x04")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
