"""Tests for the interpolated Kneser-Ney baseline (export/ngram.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmd.export.ngram import KneserNey

# Training text over ids 0..9 with some structure; ids 10 and 11 never occur in it.
VOCAB = 12
TRAIN = [2, 3, 4, 2, 3, 5, 6, 2, 3, 4, 7, 8, 9, 1, 2, 3, 4, 0, 5, 6, 2, 9, 1, 3, 3, 4, 2, 8]


def total_prob(model: KneserNey, context: list[int]) -> float:
    return sum(math.exp(model.logprob(context, w)) for w in range(model.vocab_size))


@pytest.mark.parametrize("discount", [None, 0.3, 1.0])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_distribution_sums_to_one(order: int, discount: float | None) -> None:
    model = KneserNey(order, discount).fit(TRAIN, VOCAB)
    full = order - 1
    contexts = {
        "seen full context": TRAIN[5 : 5 + full],
        "only its shorter suffix seen": [11, *TRAIN[5 : 5 + full - 1]],
        "unseen": [10, 11, 10][:full],
        "empty": [],
        "long context (truncated)": [10, 11, *TRAIN[:6]],
    }
    for name, context in contexts.items():
        assert total_prob(model, context) == pytest.approx(1.0, abs=1e-9), name
    # The context matters: a seen context changes the distribution.
    seen, empty = contexts["seen full context"], contexts["empty"]
    assert model.logprob(seen, TRAIN[5 + full]) > model.logprob(empty, TRAIN[5 + full]) + 0.1


@settings(max_examples=40, deadline=None)
@given(
    train=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    context=st.lists(st.integers(0, 6), max_size=4),
    order=st.integers(1, 4),
)
def test_distribution_sums_to_one_on_random_text(train: list[int], context: list[int], order: int) -> None:
    model = KneserNey(order).fit(train, 7)
    assert total_prob(model, context) == pytest.approx(1.0, abs=1e-9)
    assert all(0 < d <= 1 for d in model.discounts)


# Hand-checkable corpus "a b a b c a b a" with a, b, c = 2, 3, 4 and V = 5 (ids 0 and 1 unseen).
HAND = [2, 3, 2, 3, 4, 2, 3, 2]
HAND_V = 5
D = 0.5


def hand_unigram(w: int) -> float:
    # Distinct bigram types: (2,3) (3,2) (3,4) (4,2) -> N1+(••) = 4.
    # Continuation counts N1+(• w): 2 is preceded by {3, 4} -> 2; 3 by {2} -> 1; 4 by {3} -> 1.
    # 3 types have nonzero count, so D * 3 / 4 of the mass goes to the uniform 1/5.
    continuation = {2: 2, 3: 1, 4: 1}.get(w, 0)
    return max(continuation - D, 0) / 4 + D * 3 / 4 * (1 / HAND_V)


def test_hand_computed_unigram_values() -> None:
    # Spelled out once so the helper itself is checked: 1.5/4 + 0.075, 0.5/4 + 0.075, 0.075.
    assert hand_unigram(2) == pytest.approx(0.45)
    assert hand_unigram(3) == hand_unigram(4) == pytest.approx(0.2)
    assert hand_unigram(0) == pytest.approx(0.075)


def test_bigram_matches_hand_computation() -> None:
    model = KneserNey(order=2, discount=D).fit(HAND, HAND_V)
    # Raw bigram counts: (2,3): 3, (3,2): 2, (3,4): 1, (4,2): 1.
    # After 3: c(3 •) = 3 over 2 types -> P(w | 3) = max(c(3 w) - D, 0) / 3 + D * 2 / 3 * P1(w).
    expected_after_3 = {
        2: (2 - D) / 3 + D * 2 / 3 * hand_unigram(2),  # 0.65
        4: (1 - D) / 3 + D * 2 / 3 * hand_unigram(4),
        3: D * 2 / 3 * hand_unigram(3),
        0: D * 2 / 3 * hand_unigram(0),
    }
    for w, p in expected_after_3.items():
        assert math.exp(model.logprob([3], w)) == pytest.approx(p, rel=1e-12)
    assert math.exp(model.logprob([3], 2)) == pytest.approx(0.65)
    # After 2: only (2,3), 3 times -> one type.
    assert math.exp(model.logprob([2], 3)) == pytest.approx((3 - D) / 3 + D * 1 / 3 * hand_unigram(3))
    # Context 1 never occurs: the unigram distribution, unchanged.
    for w in range(HAND_V):
        assert math.exp(model.logprob([1], w)) == pytest.approx(hand_unigram(w), rel=1e-12)
        assert math.exp(model.logprob([], w)) == pytest.approx(hand_unigram(w), rel=1e-12)


def test_trigram_matches_hand_computation() -> None:
    model = KneserNey(order=3, discount=D).fit(HAND, HAND_V)

    # Middle order uses continuation counts N1+(• u w) over the distinct trigrams
    # (2,3,2) (3,2,3) (2,3,4) (3,4,2) (4,2,3):
    #   (3,2) <- {2}: 1;  (2,3) <- {3, 4}: 2;  (3,4) <- {2}: 1;  (4,2) <- {3}: 1.
    # After 3: (3,2) and (3,4), 1 each: total 2 over 2 types.
    def bigram_after_3(w: int) -> float:
        return max({2: 1, 4: 1}.get(w, 0) - D, 0) / 2 + D * 2 / 2 * hand_unigram(w)

    # After 2: only (2,3) with continuation count 2: total 2 over 1 type.
    assert math.exp(model.logprob([0, 2], 3)) == pytest.approx((2 - D) / 2 + D * 1 / 2 * hand_unigram(3))  # 0.8

    # Highest order uses raw counts: (2,3,2) twice, (2,3,4) once -> after (2,3): total 3 over 2 types.
    for w in range(HAND_V):
        raw = {2: 2, 4: 1}.get(w, 0)
        expected = max(raw - D, 0) / 3 + D * 2 / 3 * bigram_after_3(w)
        assert math.exp(model.logprob([2, 3], w)) == pytest.approx(expected, rel=1e-12)
        # Context (4,3) never occurs as a trigram context: back off fully to P(w | 3).
        assert math.exp(model.logprob([4, 3], w)) == pytest.approx(bigram_after_3(w), rel=1e-12)
        # A one-token context is scored by the (continuation-count) bigram level.
        assert math.exp(model.logprob([3], w)) == pytest.approx(bigram_after_3(w), rel=1e-12)
    assert math.exp(model.logprob([2, 3], 2)) == pytest.approx(1.5 / 3 + 1 / 3 * 0.475)


def test_estimated_discounts_match_count_of_counts() -> None:
    model = KneserNey(order=3).fit(HAND, HAND_V)
    # Unigram continuation counts 2, 1, 1: n1 = 2, n2 = 1 -> 2 / 4.
    # Bigram continuation counts 1, 2, 1, 1: n1 = 3, n2 = 1 -> 3 / 5.
    # Trigram raw counts 2, 1, 1, 1, 1: n1 = 4, n2 = 1 -> 4 / 6.
    assert model.discounts == pytest.approx([2 / 4, 3 / 5, 4 / 6])


def test_discount_without_singletons_falls_back() -> None:
    # Bigrams of a repeated pair: (2,3) 10 times, (3,2) 9 times -> no singletons, so D = 0.5.
    # Unigram continuation counts: 2 <- {3}, 3 <- {2}: n1 = 2, n2 = 0 -> D = 2 / 2 = 1.
    model = KneserNey(order=2).fit([2, 3] * 10, 5)
    assert model.discounts == [1.0, 0.5]
    assert math.isfinite(model.logprob([2], 0))


def test_perplexity_uses_documented_contexts() -> None:
    model = KneserNey(order=3, discount=0.7).fit(TRAIN, VOCAB)
    text = [3, 4, 2, 11, 3, 5, 6, 0]
    logprobs = [model.logprob(text[max(0, i - 2) : i], text[i]) for i in range(1, len(text))]
    assert model.perplexity(text) == pytest.approx(math.exp(-sum(logprobs) / len(logprobs)), rel=1e-12)


def markov_text(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    """Each token is mostly decided by the previous two, with 10% noise."""
    text = [0, 1]
    for _ in range(length - 2):
        if rng.random() < 0.1:
            text.append(int(rng.integers(vocab)))
        else:
            text.append((3 * text[-1] + text[-2] + 1) % vocab)
    return text


def test_training_text_beats_shuffled_text() -> None:
    rng = np.random.default_rng(0)
    text = markov_text(rng, 5000, 50)
    model = KneserNey(order=3).fit(text, 50)
    shuffled = list(rng.permutation(text))
    assert model.perplexity(text) < 0.5 * model.perplexity(shuffled)


def test_trigram_beats_unigram_on_repetitive_text() -> None:
    rng = np.random.default_rng(1)
    train, held_out = markov_text(rng, 5000, 50), markov_text(rng, 1000, 50)
    trigram = KneserNey(order=3).fit(train, 50).perplexity(held_out)
    unigram = KneserNey(order=1).fit(train, 50).perplexity(held_out)
    assert trigram < 0.3 * unigram


def test_uniform_text_has_perplexity_close_to_vocab_size() -> None:
    rng = np.random.default_rng(2)
    vocab = 50
    model = KneserNey(order=1).fit(rng.integers(vocab, size=100_000).tolist(), vocab)
    assert model.perplexity(rng.integers(vocab, size=20_000).tolist()) == pytest.approx(vocab, rel=0.03)


def test_unseen_token_gets_nonzero_probability() -> None:
    for order in (1, 2, 3):
        model = KneserNey(order).fit(TRAIN, VOCAB)
        assert math.isfinite(model.logprob(TRAIN[:2], 10))
        assert math.isfinite(model.perplexity([10, 11, 10, 11]))


def test_invalid_input_raises() -> None:
    with pytest.raises(ValueError):
        KneserNey().fit([], 10)
    with pytest.raises(ValueError):
        KneserNey().fit([1, 2, 10], 10)
    with pytest.raises(ValueError):
        KneserNey().fit([1, -1, 2], 10)
    with pytest.raises(ValueError):
        KneserNey(order=0)
    with pytest.raises(ValueError):
        KneserNey(discount=1.5)
    with pytest.raises(ValueError):
        KneserNey(discount=0.0)
    with pytest.raises(RuntimeError):
        KneserNey().logprob([1], 2)
    model = KneserNey().fit(TRAIN, VOCAB)
    with pytest.raises(ValueError):
        model.logprob([1], VOCAB)
    with pytest.raises(ValueError):
        model.perplexity([1])
    with pytest.raises(ValueError):
        model.perplexity([1, 2, VOCAB])
