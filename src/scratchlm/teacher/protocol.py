"""The teacher contract: what every backend (a local model, an OpenAI-compatible server, a Python function)
gives its callers, in types rather than prose.

A teacher writes text (``complete``) and scores given text (``score``). Either way it can hand over what it
knew at each position: its **raw** distribution (before temperature, top-k and top-p, what distillation wants;
vLLM calls it ``raw_logprobs``) truncated to the k most likely tokens, as ``TopK``. A ``Completion`` carries
the teacher's own token ids; its text is derived from them, so nothing downstream tokenizes a teacher's text
again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..data.feed_protocol import LOGPROB_SLACK
from .sampling import SamplingParams


@dataclass
class TopK:
    """A teacher's distribution at n positions: its k most likely next tokens and their log-probabilities, and
    the log-probability of the token that is actually next (sampled, or given when scoring)."""

    ids: np.ndarray
    """(n, k) int32, most likely first."""
    logprobs: np.ndarray
    """(n, k) float32."""
    token_logprobs: np.ndarray
    """(n,) float32."""
    token_ranks: np.ndarray | None = None
    """(n,) int: where that token ranks (1: most likely), where known."""

    def __len__(self) -> int:
        return len(self.token_logprobs)

    @staticmethod
    def empty(k: int) -> TopK:
        return TopK(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: list[TopK], k: int) -> TopK:
        if not parts:
            return TopK.empty(k)
        ranks = [p.token_ranks for p in parts]
        return TopK(np.concatenate([p.ids for p in parts]), np.concatenate([p.logprobs for p in parts]),
                    np.concatenate([p.token_logprobs for p in parts]),
                    None if any(r is None for r in ranks) else np.concatenate(ranks))


def topk_problem(rows: TopK | None, n: int, k: int, vocab_size: int) -> str | None:
    """Why a teacher's top-k for ``n`` positions cannot be trained on, or None: rows for each position, k
    entries each, ids inside the vocabulary, log-probabilities not NaN, not +inf and not above zero (-inf is
    an entry the teacher did not give: probability 0)."""
    if rows is None:
        return None
    if rows.ids.shape != (n, k) or rows.logprobs.shape != (n, k) or len(rows.token_logprobs) != n:
        width = rows.ids.shape[-1] if rows.ids.ndim == 2 else "?"
        return f"{len(rows.token_logprobs)} positions of {width} entries for {n} tokens at k {k}"
    if n and (int(rows.ids.min()) < 0 or int(rows.ids.max()) >= vocab_size):
        return f"token ids outside the vocabulary [0, {vocab_size})"
    for name, values in (("top-k", rows.logprobs), ("sampled-token", rows.token_logprobs)):
        if np.isnan(values).any() or np.isposinf(values).any():
            return f"{name} log-probabilities that are NaN or +inf"
        if (values > LOGPROB_SLACK).any():
            return f"positive {name} log-probabilities"
    return None


def completion_problem(c: Completion, k: int, vocab_size: int) -> str | None:
    """Why a teacher's completion cannot be trained on, or None: its token ids inside the vocabulary, and
    with ``k`` > 0 its top-k rows one a token (``topk_problem``)."""
    ids = c.token_ids
    if ids is not None and ids and (min(ids) < 0 or max(ids) >= vocab_size):
        return f"token ids outside the vocabulary [0, {vocab_size})"
    if k and c.logprobs is not None:
        return topk_problem(c.logprobs, len(ids) if ids is not None else len(c.logprobs), k, vocab_size)
    return None


class TeacherAnswerError(ValueError):
    """A teacher's answer that cannot be read as what was asked (the reason in the message)."""


@dataclass
class Completion:
    """What a teacher wrote for one prompt."""

    token_ids: list[int] | None
    """The teacher's own tokens (its stop token excluded); None from a backend that only has text (a
    function)."""
    text: str
    """``token_ids`` decoded."""
    finished: bool
    """Stopped at <|endoftext|> rather than at max tokens."""
    logprobs: TopK | None = None
    """With ``SamplingParams.logprobs`` = k: the distribution each token was drawn from, one row per token."""
    problem: str | None = None
    """Why the teacher's answer could not be read as ids and rows (a feed drops such a completion and counts
    the reason)."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else 0


@runtime_checkable
class Teacher(Protocol):
    """Every teacher backend. ``submit``/``submit_score`` return futures (callers keep work in flight);
    ``complete``/``score`` wait for them."""

    name: str
    prompts_per_request: int
    """What a feed sends per request: few, so finished texts come back early."""
    max_in_flight: int
    """Sequences a feed keeps submitted to saturate it."""
    in_flight: int

    def submit(self, prompts: list, params: SamplingParams, seed: int | None = None) -> Future:
        """Future of ``list[Completion]``, one per prompt (a string, or token ids)."""

    def complete(self, prompts: list, params: SamplingParams, seed: int | None = None) -> list[Completion]:
        ...

    def submit_score(self, sequences: list[list[int]], k: int) -> Future:
        """Future of ``list[TopK]``: for each token sequence, the distribution at every token but the first
        (n − 1 rows for n tokens), in one forward pass and no decoding."""

    def score(self, sequences: list[list[int]], k: int) -> list[TopK]:
        ...

    def close(self) -> None:
        ...


# ------------------------------------------------------------------------- futures, as backends combine them


def chain(future: Future, then: Callable) -> Future:
    """A future of ``then(future's result)``; failures pass through, and cancelling it cancels ``future`` (an
    engine drops a cancelled request's sequences at its next step)."""
    out: Future = Future()

    def done(f: Future) -> None:
        if out.done():  # cancelled by its caller
            return
        try:
            out.set_result(then(f.result()))
        except Exception as err:
            out.set_exception(err)

    future.add_done_callback(done)
    out.add_done_callback(lambda f: future.cancel() if f.cancelled() else None)
    return out


def gather(futures: list[Future]) -> Future:
    """A future of the concatenated results of ``futures`` (lists), in order; the first failure fails it."""
    out: Future = Future()
    results: list = [None] * len(futures)
    remaining = [len(futures)]

    def done(i: int, f: Future) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
            return
        if f.exception() is not None:
            out.set_exception(f.exception())
            return
        results[i] = f.result()
        remaining[0] -= 1
        if remaining[0] == 0:
            out.set_result([c for part in results for c in part])

    if not futures:
        out.set_result([])
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: done(i, f))
    out.add_done_callback(lambda o: [f.cancel() for f in futures] if o.cancelled() else None)
    return out
