"""bench.tokenizer_speed, the experiment behind keeping lstmd's hand-written word tokenizer: it
must still run, and the ``tokenizers`` pipeline it measures must still equal the hand-written
tokenizer on the bundled model's test split (else its speed figures compare different work)."""

from __future__ import annotations

import pytest

from bench import tokenizer_speed


@pytest.mark.timeout(300)
def test_the_pipeline_equals_the_hand_written_tokenizer_on_the_test_split(capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer_speed.main(["--quick"])
    out = capsys.readouterr().out
    assert "test split: 19 documents, 197,905 tokens: identical" in out, out
    assert "pipeline takes" in out and "feeds of 10 words" in out, out
