"""The bundled default model: present, valid, within its size and quality targets, and served
by default."""

from __future__ import annotations

import numpy as np

from lstmd.model.folder import ONNX_FILE, read_model_dir
from lstmd.server.registry import load_models
from lstmd.server.settings import BUNDLED_MODELS, Settings


def test_bundled_model_is_valid_small_and_beats_the_baseline() -> None:
    folder = BUNDLED_MODELS / "pd-english" / "1"
    card, vocab = read_model_dir(folder)  # files, card, checksum, vocabulary size
    assert (folder / ONNX_FILE).stat().st_size <= 20_000_000
    assert card.perplexity["test"] <= 0.75 * card.perplexity["baseline_test"]
    assert card.verification["max_abs_difference"]["parity_real"] <= 1e-4
    assert len(vocab) == card.vocab_size == 10_000


def test_the_server_serves_it_by_default() -> None:
    registry = load_models(Settings())  # the default models directory
    model = registry.get("")
    assert model.name == "pd-english"
    state = model.zero_state(1)
    ids = np.array([model.vocab.encode_text("the united states of")], np.int64)
    out = model.run(ids, state[0], state[1], 50)
    top = [model.vocab.words[i] for i in out.top_ids[0]]
    assert "america" in top, "a model trained on State of the Union addresses knows this phrase"
