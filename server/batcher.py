"""Batching the steps of many sessions into one ONNX Runtime call.

Every feed reaches the model as steps: a single-token step (the common case while streaming)
or a prompt (many tokens of one session, run as one call). A worker per model takes whatever is
queued, up to ``max_batch_size``, and runs it:

- single-token steps of different sessions share one call;
- prompts of the same length share a call; prompts are never padded, so no padding can leak
  into any session's state;
- a lone request never waits: the worker only waits (up to ``max_batch_wait_ms``) for more
  requests when the previous batch was larger than what is queued now, i.e. when other
  sessions are active and about to send their next step.

The worker runs ONNX Runtime and the post-processing (top-k in the graph, sampling here, both
over the whole batch) in a thread, so the event loop keeps serving while the model runs.

A batch of one single-token step runs on the event loop itself: the hop to the thread and
back costs about as much as the step, and no other step is waiting. Batching is not lost:
while such a step runs, other sessions' requests pile up, and the next batch takes them all.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from lstmd.server import metrics
from lstmd.server.registry import Model


@dataclass
class Sampling:
    """How to draw the next word from a step's distribution."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    banned: tuple[int, ...] = ()  # token ids never drawn
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


@dataclass
class StepResult:
    logprobs: np.ndarray  # (vocab,): log-probabilities of the next word; empty unless asked for
    top_ids: np.ndarray  # (k,) most likely first
    top_logprobs: np.ndarray  # (k,)
    state: np.ndarray  # (2, layers, hidden): h and c after the step
    sampled: int = -1  # with Sampling: the drawn word
    sampled_prob: float = 0.0  # and its probability under the sampling distribution


@dataclass(slots=True)
class Rows:
    """The results of a ``run_rows`` request: row i is its i-th sequence."""

    top_ids: np.ndarray  # (rows, k) most likely first
    top_logprobs: np.ndarray  # (rows, k)
    states: list[np.ndarray]  # per row (2, layers, hidden), each its own array: h and c after the step


@dataclass(slots=True)
class _Request:
    tokens: np.ndarray  # (rows, time) int64
    state: np.ndarray  # (2, layers, rows, hidden)
    top_k: int
    sampling: Sampling | None
    logprobs: bool  # the caller needs the whole distribution
    future: asyncio.Future[StepResult] | asyncio.Future[Rows]
    queued_at: float
    many: bool = False  # a run_rows request: answered with Rows

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])


class Batcher:
    def __init__(self, model: Model, executor: Executor, max_batch_size: int, max_wait_s: float):
        self.model = model
        self._executor = executor
        self._max_batch = max_batch_size
        self._max_wait = max_wait_s
        self._queue: list[_Request] = []  # in arrival order
        self._queued_rows = 0
        self._wanted_rows = 1  # the worker is woken once this many rows are queued (or its timer fires)
        self._wake: asyncio.Future[None] | None = None
        self._last_batch = 0
        self._worker: asyncio.Task[None] | None = None
        self._running: list[_Request] = []  # the batch in ONNX Runtime now
        self._stopped: Exception | None = None  # what every request gets once stopped
        # labelled metric children, looked up once rather than per step
        name, version = model.name, model.version
        self._queue_wait = metrics.queue_wait.labels(name, version)
        self._metrics = {
            phase: (metrics.inference_seconds.labels(name, version, phase),
                    metrics.batch_size.labels(name, version, phase), metrics.tokens.labels(name, version, phase))
            for phase in ("step", "prompt")
        }  # fmt: skip

    def start(self) -> None:
        name = f"batcher-{self.model.name}/{self.model.version}"
        self._worker = asyncio.get_running_loop().create_task(self._run_forever(), name=name)

    async def stop(self, error: Exception | None = None) -> None:
        """Stop the worker. Every request queued or in ONNX Runtime now, and every later one, fails with
        ``error`` (a version unloaded under calls that still held its sessions): none is left waiting."""
        self._stopped = error or RuntimeError(f"the batcher of {self.model.name} version {self.model.version} stopped")
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for request in [*self._running, *self._queue]:
            if not request.future.done():
                request.future.set_exception(self._stopped)
        self._running, self._queue, self._queued_rows = [], [], 0

    async def run(
        self, tokens: list[int], state: np.ndarray, top_k: int, sampling: Sampling | None = None, logprobs: bool = False
    ) -> StepResult:
        """Run ``tokens`` (one or more) of one session from ``state``. With ``logprobs`` (or
        ``sampling``) the result carries the whole distribution after the last token."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        ids = np.asarray(tokens, np.int64)[None, :]
        full = logprobs or sampling is not None
        self._put(_Request(ids, state[:, :, None], max(top_k, 1), sampling, full, future, time.perf_counter()))
        return await future

    async def run_rows(self, tokens: np.ndarray, states: list[np.ndarray], top_k: int) -> Rows:
        """One single-token step of each of many sessions, ``tokens`` (rows,) from ``states``, as one
        request: one future and one queue entry for all of them (FeedMany's batched items)."""
        future: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        state = np.stack(states, axis=2)  # (2, layers, rows, hidden)
        self._put(_Request(tokens.reshape(-1, 1), state, max(top_k, 1), None, False, future, time.perf_counter(), True))
        return await future

    def _put(self, request: _Request) -> None:
        if self._stopped is not None:
            raise self._stopped
        self._queue.append(request)
        self._queued_rows += request.rows
        if self._wake is not None and self._queued_rows >= self._wanted_rows:
            _wake_up(self._wake)

    async def _rows_or_timeout(self, rows: int, timeout: float | None) -> None:
        """Until ``rows`` rows are queued, or ``timeout`` seconds (None: no limit) have passed: one
        future and at most one timer for the wait, not one per request."""
        loop = asyncio.get_running_loop()
        self._wanted_rows, self._wake = rows, loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _wake_up, self._wake)
        try:
            await self._wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _take(self) -> list[_Request]:
        """The oldest requests queued, up to ``max_batch_size`` rows (at least one request)."""
        taken, rows = 0, 0
        while taken < len(self._queue) and (taken == 0 or rows + self._queue[taken].rows <= self._max_batch):
            rows += self._queue[taken].rows
            taken += 1
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        self._queued_rows -= rows
        return batch

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                await self._rows_or_timeout(1, None)
            # wait for company only while the previous batch was larger than what is queued now
            company = min(self._last_batch, self._max_batch)
            if self._queued_rows < company and self._max_wait > 0:
                await self._rows_or_timeout(company, self._max_wait)
            batch = self._take()
            self._last_batch = sum(r.rows for r in batch)
            live = [r for r in batch if not r.future.done()]  # the caller may have been cancelled
            self._running = live
            for group in _group_by_length(live):
                results: list[StepResult | Rows | Exception]
                try:
                    if len(live) == 1 and group[0].tokens.size == 1:
                        results = list(self._compute(group))
                    else:
                        results = list(await loop.run_in_executor(self._executor, self._compute, group))
                except Exception as e:  # reported to every caller of this batch
                    results = [e] * len(group)
                for request, result in zip(group, results, strict=True):
                    if request.future.done():
                        continue
                    if isinstance(result, Exception):
                        request.future.set_exception(result)
                    else:
                        request.future.set_result(result)  # type: ignore[arg-type]

    def _compute(self, group: list[_Request]) -> list[StepResult | Rows]:
        """One ONNX Runtime call for requests of equal length, then vectorised post-processing."""
        started = time.perf_counter()
        steps = group[0].tokens.shape[1]
        for r in group:
            self._queue_wait.observe(started - r.queued_at)
        if len(group) == 1:
            tokens, state = group[0].tokens, group[0].state
        else:
            tokens = np.concatenate([r.tokens for r in group])  # (batch, time)
            state = np.concatenate([r.state for r in group], axis=2)  # (2, layers, batch, hidden)
        k = max(r.top_k for r in group)
        sampled: list[tuple[StepResult, int, Sampling]] = []  # with the row of each
        out = self.model.run(tokens, state[0], state[1], k, with_logprobs=any(r.logprobs for r in group))
        new_state = np.stack([out.h, out.c])  # (2, layers, batch, hidden)
        results: list[StepResult | Rows] = []
        row = 0
        for r in group:
            if r.many:
                rows = range(row, row + r.rows)
                results.append(Rows(out.top_ids[rows.start : rows.stop, : r.top_k],
                                    out.top_logprobs[rows.start : rows.stop, : r.top_k],
                                    [new_state[:, :, i].copy() for i in rows]))  # fmt: skip
            else:
                result = StepResult(out.logprobs[row], out.top_ids[row, : r.top_k], out.top_logprobs[row, : r.top_k],
                                    new_state[:, :, row].copy())  # fmt: skip
                if r.sampling is not None:
                    sampled.append((result, row, r.sampling))
                results.append(result)
            row += r.rows
        if sampled:
            words, probs = sample(out.logprobs[[i for _, i, _ in sampled]], [p for _, _, p in sampled])
            for (result, _, _), word, prob in zip(sampled, words, probs, strict=True):
                result.sampled, result.sampled_prob = int(word), float(prob)
        seconds, batch_size, tokens_total = self._metrics["step" if steps == 1 else "prompt"]
        seconds.observe(time.perf_counter() - started)
        batch_size.observe(row)
        tokens_total.inc(row * steps)
        return results


def _wake_up(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _group_by_length(requests: list[_Request]) -> list[list[_Request]]:
    groups: dict[int, list[_Request]] = {}
    for r in requests:
        groups.setdefault(r.tokens.shape[1], []).append(r)
    return list(groups.values())


def sample(logprobs: np.ndarray, params: list[Sampling]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one word per row of ``logprobs`` (rows, vocab), each row with its own settings.

    Temperature, top-k, top-p and banned words are applied to all rows at once; only the
    uniform draw comes from each row's own generator (so a seed reproduces a row's words
    whatever else shares its batch). Returns the words and their sampling probabilities.

    Numerically safe for every temperature > 0, down to the smallest float32 (a denormal): each
    row's most likely word is moved to 0 before dividing, in float64, so the scaled values are 0
    for it and finite or -inf below it, never NaN; a temperature near 0 is greedy decoding, the
    most likely word with probability 1.
    """
    rows, vocab = logprobs.shape
    scaled = logprobs.astype(np.float64)  # (rows, vocab)
    for i, p in enumerate(params):
        scaled[i, list(p.banned)] = -np.inf
    scaled -= scaled.max(axis=1, keepdims=True)  # <= 0: dividing can no longer overflow (x / 1e-45 < 1e84)
    scaled /= np.array([p.temperature for p in params], np.float64)[:, None]
    order = np.argsort(-scaled, axis=1, kind="stable")  # (rows, vocab) most likely first
    ranked = np.take_along_axis(scaled, order, axis=1)
    probs = np.exp(ranked)  # ranked[:, 0] is 0: the most likely word's weight is 1
    probs /= probs.sum(axis=1, keepdims=True)
    top_k = np.array([p.top_k or vocab for p in params])[:, None]
    top_p = np.array([p.top_p if 0 < p.top_p < 1 else 1.0 for p in params])[:, None]
    # keep a word if it is within top_k and the words ranked above it hold less than top_p
    before = np.cumsum(probs, axis=1) - probs
    keep = (np.arange(vocab)[None, :] < top_k) & (before < top_p)
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    draws = np.array([p.rng.random() for p in params])[:, None]
    last_kept = (probs > 0).sum(axis=1) - 1  # kept words are a prefix of the ranking
    index = np.minimum((np.cumsum(probs, axis=1) < draws).sum(axis=1), last_kept)
    picked = np.arange(rows)
    return order[picked, index], probs[picked, index]
