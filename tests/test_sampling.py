"""Vectorised sampling: each row follows its own temperature, top-k, top-p and banned words."""

from __future__ import annotations

import numpy as np

from lstmd.server.batcher import Sampling, sample

PROBS = np.array([0.5, 0.25, 0.15, 0.07, 0.03])


def draw(params: Sampling, n: int = 4000) -> np.ndarray:
    logprobs = np.log(np.tile(PROBS, (n, 1))).astype(np.float32)
    words, _ = sample(logprobs, [params] * n)
    return np.bincount(words, minlength=PROBS.size) / n


def test_plain_sampling_follows_the_distribution() -> None:
    assert np.allclose(draw(Sampling(rng=np.random.default_rng(0))), PROBS, atol=0.03)


def test_top_k_top_p_and_banned_words_cut_the_distribution() -> None:
    top2 = draw(Sampling(top_k=2, rng=np.random.default_rng(1)))
    assert np.allclose(top2, [2 / 3, 1 / 3, 0, 0, 0], atol=0.03)
    nucleus = draw(Sampling(top_p=0.8, rng=np.random.default_rng(2)))  # 0.5 + 0.25 < 0.8: the third word joins
    assert np.allclose(nucleus, np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9, atol=0.03)
    banned = draw(Sampling(banned=(0,), rng=np.random.default_rng(3)))
    assert banned[0] == 0 and np.allclose(banned[1:], PROBS[1:] / 0.5, atol=0.03)


def test_temperature_sharpens_and_flattens() -> None:
    cold = draw(Sampling(temperature=0.25, rng=np.random.default_rng(4)))
    hot = draw(Sampling(temperature=4.0, rng=np.random.default_rng(5)))
    assert cold[0] > 0.9 and hot[0] < 0.35


def test_rows_are_independent_and_seeded() -> None:
    logprobs = np.log(np.tile(PROBS, (3, 1))).astype(np.float32)
    params = [Sampling(top_k=1), Sampling(banned=(0, 1, 2, 3)), Sampling(rng=np.random.default_rng(9))]
    words, probs = sample(logprobs, params)
    assert words[0] == 0 and probs[0] == 1.0
    assert words[1] == 4 and probs[1] == 1.0
    again, _ = sample(logprobs[2:], [Sampling(rng=np.random.default_rng(9))])
    assert again[0] == words[2]
