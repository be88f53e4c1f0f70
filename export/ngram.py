"""Interpolated Kneser-Ney n-gram language model: the perplexity baseline for the LSTM.

Any LSTM perplexity we report is set beside this model, trained on the same token ids over the
same closed vocabulary. We wrote it because no maintained library estimates Kneser-Ney quickly
here: nltk's ``KneserNeyInterpolated`` is far too slow at a million tokens, and kenlm's pip
package only queries models (estimation needs its C++ ``lmplz`` binary). Plain dicts of n-gram tuples
train on ~1.5M tokens in seconds.

This is plain interpolated Kneser-Ney (Chen & Goodman 1998, section 3.5), one discount per
order, not the modified variant with three. For order ``k`` and context ``h`` of ``k - 1`` tokens:

    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h •)  +  D_k * N1+(h •) / c_k(h •) * P_{k-1}(w | h')

where ``h'`` drops the first token of ``h``, ``c_k(h •) = sum_w c_k(h w)`` and ``N1+(h •)`` is the
number of distinct ``w`` with ``c_k(h w) > 0``. At the highest order ``c_k`` is the raw count; at
lower orders it is the continuation count ``N1+(• h w)``, the number of distinct tokens seen just
before ``h w``. A context never seen at order ``k`` backs off fully: ``P_k(w | h) = P_{k-1}(w | h')``.
Below order 1 is the uniform distribution ``P_0(w) = 1 / V``, so every in-vocabulary token gets
nonzero probability.

Token ids are one stream; there are no sentence-start tokens (``<eos>``, id 1, is an ordinary token).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

Ngram = tuple[int, ...]


def _ngrams(tokens: list[int], n: int) -> Iterator[Ngram]:
    """Every n-gram of the stream, in order (overlapping)."""
    return zip(*(tokens[i:] for i in range(n)), strict=False)  # ends with the last full n-gram


def _estimate_discount(counts: Counter[Ngram]) -> float:
    """D = n1 / (n1 + 2 n2) from the count-of-counts (Ney et al. 1994).

    Without singletons the estimate would be 0 (or 0/0) and unseen events would get zero
    probability, so we fall back to D = 0.5. This happens on tiny or repetitive texts, and for the
    raw unigram counts of ``order=1`` over a vocabulary cut to the most frequent words.
    """
    count_of_counts = Counter(counts.values())
    n1, n2 = count_of_counts[1], count_of_counts[2]
    return n1 / (n1 + 2 * n2) if n1 > 0 else 0.5


class KneserNey:
    """Interpolated Kneser-Ney language model over token ids ``0 .. vocab_size - 1``.

    ``discount`` is used at every order; ``None`` estimates one per order from the training
    counts. After ``fit``, ``discounts[k - 1]`` is the discount used at order ``k``.
    """

    def __init__(self, order: int = 3, discount: float | None = None):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        # D > 1 would make the probabilities sum to less than 1; D = 0 gives unseen tokens probability 0.
        if discount is not None and not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.order = order
        self.discount = discount
        self.vocab_size = 0  # 0 until fitted
        self.discounts: list[float] = []
        # Index k - 1 holds order k: counts c_k of k-grams, and per context h (k - 1 tokens)
        # the total c_k(h •) and the number of distinct continuations N1+(h •).
        self._counts: list[Counter[Ngram]] = []
        self._context_total: list[dict[Ngram, int]] = []
        self._context_types: list[dict[Ngram, int]] = []

    def fit(self, ids: Sequence[int], vocab_size: int) -> KneserNey:
        """Count the n-grams of the token stream ``ids``. Returns ``self``."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        tokens = _as_tokens(ids, vocab_size)
        self.vocab_size = vocab_size
        self._counts, self._context_total, self._context_types, self.discounts = [], [], [], []
        for k in range(1, self.order + 1):
            if k == self.order:
                counts = Counter(_ngrams(tokens, k))
            else:
                # Continuation count: each distinct (k+1)-gram v g adds one left-extension to its suffix g.
                counts = Counter(gram[1:] for gram in set(_ngrams(tokens, k + 1)))
            total: dict[Ngram, int] = {}
            types: dict[Ngram, int] = {}
            for gram, count in counts.items():
                context = gram[:-1]
                total[context] = total.get(context, 0) + count
                types[context] = types.get(context, 0) + 1
            self._counts.append(counts)
            self._context_total.append(total)
            self._context_types.append(types)
            self.discounts.append(self.discount if self.discount is not None else _estimate_discount(counts))
        return self

    def logprob(self, context: Sequence[int], token: int) -> float:
        """Natural log of P(token | the last ``order - 1`` ids of ``context``).

        A shorter context (fewer than ``order - 1`` ids) is scored by the lower-order model of
        its length, which uses continuation counts.
        """
        self._check_fitted()
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary 0..{self.vocab_size - 1}")
        start = max(0, len(context) - (self.order - 1))
        return math.log(self._prob(tuple(int(t) for t in context[start:]), int(token)))

    def perplexity(self, ids: Sequence[int]) -> float:
        """exp of the mean negative log probability of ``ids[1:]``.

        Token ``ids[i]`` (for i >= 1) is scored with ``ids[max(0, i - order + 1):i]`` as its context,
        so the first ``order - 2`` scored tokens have shorter contexts (see ``logprob``). ``ids[0]``
        is context only.
        """
        self._check_fitted()
        tokens = _as_tokens(ids, self.vocab_size)
        if len(tokens) < 2:
            raise ValueError("perplexity needs at least 2 tokens (the first is only context)")
        history = self.order - 1
        neg_logprob = -sum(
            math.log(self._prob(tuple(tokens[max(0, i - history) : i]), tokens[i])) for i in range(1, len(tokens))
        )
        return math.exp(neg_logprob / (len(tokens) - 1))

    def _prob(self, context: Ngram, token: int) -> float:
        """P(token | context) with ``len(context) <= order - 1``, built up from order 0 (uniform)."""
        prob = 1.0 / self.vocab_size
        for k in range(1, len(context) + 2):
            h = context[len(context) - (k - 1) :]  # the last k - 1 tokens
            total = self._context_total[k - 1].get(h)
            if total is None:  # context unseen at order k: P_k = P_{k-1}
                continue
            discount = self.discounts[k - 1]
            count = self._counts[k - 1].get((*h, token), 0)
            # Discounted count, plus the mass taken by discounting (D per distinct continuation)
            # spread over the lower order.
            prob = (max(count - discount, 0.0) + discount * self._context_types[k - 1][h] * prob) / total
        return prob

    def _check_fitted(self) -> None:
        if self.vocab_size == 0:
            raise RuntimeError("call fit() before scoring")


def _as_tokens(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as a list of Python ints, checked to be non-empty and inside ``0 .. vocab_size - 1``."""
    if len(ids) == 0:
        raise ValueError("no tokens")
    array = np.asarray(ids)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 1:
        raise ValueError(f"token ids must be a 1-D sequence of integers, got dtype {array.dtype}, shape {array.shape}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise ValueError(f"token ids must be in 0..{vocab_size - 1}, got {array.min()}..{array.max()}")
    tokens: list[int] = array.tolist()
    return tokens
