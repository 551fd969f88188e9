"""What the generation engine keeps about the work it is given and hands back: a request (prompts or scoring
windows, its settings, its future), each of its sequences while in the batch, a prompt's result, the engine's
counters, and a scoring request's rows put back in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .protocol import TopK
from .sampling import SamplingParams


@dataclass
class Generated:
    """One prompt's new tokens (the stop token excluded) and, when asked, the distribution each was drawn
    from."""

    tokens: list[int]
    logprobs: TopK | None = None


@dataclass
class Request:
    params: SamplingParams
    future: Future
    results: list
    remaining: int
    waiting: deque = field(default_factory=deque)  # its sequences not yet in the batch
    score_k: int = 0
    """> 0: a scoring request (the top-k of each window's positions), not a generation."""
    owners: list[int] = field(default_factory=list)
    """Scoring: which sequence each window is of."""
    sequences: int = 0
    """Scoring: how many sequences."""
    on_token: Callable[[int, int, TopK | None], None] | None = None
    """Called from the engine's thread with (prompt, token, its distribution) as each token is accepted."""
    ranks: bool = False
    """Scoring: also where each given token ranks (vLLM's prompt_logprobs report it)."""


@dataclass
class Sequence:
    request: Request
    index: int  # which prompt (or scoring window) of its request
    prompt: list[int]
    rng: np.random.Generator | None  # None when greedy
    out: list[int] = field(default_factory=list)
    pos: int = 0  # position of the next token to feed
    last: int = 0  # the token to feed next
    rows: list[TopK] = field(default_factory=list)  # the distributions of the new tokens (logprobs > 0)
    targets: list[int] = field(default_factory=list)  # scoring: the token each position predicts


@dataclass
class EngineStats:
    """What the engine has done: for logs, metrics and tests."""

    steps: int = 0
    tokens: int = 0
    sequences: int = 0
    requests: int = 0
    most_requests_in_a_step: int = 0
    """The most distinct requests whose sequences shared one step (scoring windows prefilled in the step
    before a decode count with it)."""
    scored: int = 0
    """Positions scored (prefill only: no decoding)."""
    busy_s: float = 0.0
    """Seconds spent in steps (scoring, prefilling, decoding): the teacher's cost, apart from waiting."""
    cancelled: int = 0
    """Sequences dropped from the batch because their request was cancelled (its client went away)."""


def scores_of(request: Request) -> list[TopK]:
    """A scoring request's windows put back together, in order: one ``TopK`` per sequence."""
    parts: list[list[TopK]] = [[] for _ in range(request.sequences)]
    for owner, rows in zip(request.owners, request.results, strict=True):
        parts[owner].append(rows)
    return [TopK.concat(p, request.score_k) for p in parts]
