"""The feed's teachers: one worker per teacher keeps it saturated, all filling one bounded pool of texts.

A worker keeps ``in_flight`` sequences submitted to its teacher at all times (for a local engine, twice its
batch size, so no slot waits for a prompt; for an OpenAI-compatible server, its concurrency × prompts per
request), in requests of a few prompts, so finished texts come back early. Workers pull: a fast teacher fills
the pool as fast as it can, a slow one as fast as it can, so the work is spread by each teacher's own
throughput. A teacher that fails is marked down and probed with one request at a time, with backoff, while the
others carry on; one whose oldest request has run longer than ``stall_s`` counts as down (hung) until it
answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..teacher.diversity import DiversityMeter
from ..teacher.prompts import PromptSource
from ..teacher.protocol import Completion, TopK, completion_problem
from ..teacher.sampling import SamplingParams

log = logging.getLogger("scratchlm.feed")


@dataclass(frozen=True)
class TeacherText:
    """A text a teacher wrote, with its token ids (the teacher's own, or the feed's tokenizer's for a teacher
    that gives text only) and, when the feed keeps them, the teacher's distribution at each of them."""

    text: str
    token_ids: list[int] | None = None
    soft: TopK | None = None
    """One row per token of ``token_ids`` (the <|endoftext|> after them has none)."""

    @property
    def tokens(self) -> int:
        """Tokens the text takes in a training stream: its ids and the ``<|endoftext|>`` after it."""
        return len(self.token_ids) + 1 if self.token_ids is not None else 0


class TextPool:
    """Teacher texts ready to serve, bounded: room is reserved before a request goes out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.texts: deque[TeacherText] = deque()
        self.reserved = 0
        self.cond = threading.Condition()

    def reserve(self, n: int, stop: threading.Event) -> bool:
        """Wait for room for n more texts (False if stopped first)."""
        with self.cond:
            while len(self.texts) + self.reserved + n > max(self.capacity, n) and not stop.is_set():
                self.cond.wait(0.5)
            if stop.is_set():
                return False
            self.reserved += n
            return True

    def fill(self, reserved: int, texts: list[TeacherText]) -> None:
        """Texts that came back for a reservation (fewer, or none when the request failed)."""
        with self.cond:
            self.reserved -= reserved
            self.texts.extend(t for t in texts if t.text)
            self.cond.notify_all()

    def take_one(self, deadline: float) -> TeacherText | None:
        """The oldest text, waiting for one until ``deadline`` (``time.monotonic``); None if none came."""
        with self.cond:
            if self.cond.wait_for(lambda: bool(self.texts), max(0.0, deadline - time.monotonic())):
                text = self.texts.popleft()
                self.cond.notify_all()
                return text
            return None

    def put_back(self, texts: list[TeacherText]) -> None:
        """Texts taken for an answer that was not sent: first in line again, in their order."""
        with self.cond:
            self.texts.extendleft(reversed(texts))
            self.cond.notify_all()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the first texts (a cold teacher loads and warms up first); False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: bool(self.texts), timeout_s)


@dataclass
class TeacherStats:
    tokens: int = 0
    texts: int = 0
    errors: int = 0
    busy_s: float = 0.0
    """Seconds with at least one request in flight."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Answers refused where they entered the feed, by reason (``protocol.completion_problem``)."""

    def drop(self, teacher: str, reason: str, what: str) -> None:
        """Count an answer refused for ``reason``; the first of each reason and every 100th after it are
        logged, naming the teacher."""
        n = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if n == 1 or n % 100 == 0:
            log.warning("teacher %s: %s dropped (%s; %d so far)", teacher, what, reason, n)


@dataclass
class WorkerSettings:
    params: SamplingParams
    in_flight: int
    """Sequences kept submitted."""
    per_request: int
    """Prompts per request."""
    stall_s: float = 120.0
    diversity: DiversityMeter = field(default_factory=DiversityMeter)
    tokenize: Callable[[list[str]], list[list[int]]] | None = None
    """The feed's tokenizer (batch encode), when it counts or serves tokens."""
    generate: bool = True
    """False when the feed serves no teacher text (a teacher kept only to score the corpus): nothing is asked
    of the teacher in the background."""
    vocab_size: int | None = None
    """The feed's tokenizer's ids: a teacher's answer with an id outside them is dropped."""


class TeacherWorker:
    """Keeps one teacher saturated and puts what it writes into the shared pool (module docstring)."""

    def __init__(self, backend, prompts: PromptSource, settings: WorkerSettings, pool: TextPool,
                 owns_backend: bool = True) -> None:
        """``owns_backend``: close the backend when stopped (not one that the caller made and may share)."""
        self.backend, self.prompts, self.settings, self.pool = backend, prompts, settings, pool
        self.owns_backend = owns_backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.stats = TeacherStats()
        self.answering = True  # the last request succeeded
        self.in_flight = 0
        self._started: dict[int, float] = {}  # request number → when it went out
        self._busy_since: float | None = None
        self._retry_at = 0.0
        self._backoff = 0.5
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"scratchlm-teacher-{self.name}")
        if settings.generate:
            self._thread.start()

    @property
    def up(self) -> bool:
        """Answering, and no request stuck for longer than ``stall_s`` (a hung teacher counts as down)."""
        oldest = min(self._started.values(), default=None)
        return self.answering and (oldest is None or time.monotonic() - oldest < self.settings.stall_s)

    @property
    def tokens_per_s(self) -> float:
        busy = self.stats.busy_s + (time.monotonic() - self._busy_since if self._busy_since else 0.0)
        return self.stats.tokens / busy if busy > 0 else 0.0

    def health(self) -> dict:
        return {"name": self.name, "up": self.up, "tokens_per_s": round(self.tokens_per_s, 1),
                "in_flight": self.in_flight, "texts": self.stats.texts, "errors": self.stats.errors,
                "dropped": dict(self.stats.dropped)}

    def _room(self) -> int:
        """Sequences this worker may still submit: all of them when answering, a single probe when down."""
        limit = self.settings.in_flight if self.answering else self.settings.per_request
        return limit - self.in_flight

    def _run(self) -> None:
        n = self.settings.per_request
        number = 0
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and (self._room() < n or time.monotonic() < self._retry_at):
                    self._cond.wait(0.1)
            if not self.pool.reserve(n, self._stop):
                return
            number += 1
            with self._cond:
                self.in_flight += n
                self._started[number] = time.monotonic()
                self._busy_since = self._busy_since or time.monotonic()
            try:
                future = self.backend.submit(self.prompts.sample(n), self.settings.params)
            except Exception as err:  # the backend refused at once (closed, bad settings)
                self._done(number, n, None, err)
                continue
            future.add_done_callback(lambda f, k=number: self._done(k, n, f, None))

    def _done(self, number: int, n: int, future, error: BaseException | None) -> None:
        error = error or future.exception()
        texts = [] if error else self._texts(future.result())
        with self._cond:
            self.in_flight -= n
            self._started.pop(number, None)
            if self.in_flight == 0 and self._busy_since is not None:
                self.stats.busy_s += time.monotonic() - self._busy_since
                self._busy_since = None
            if error is None:
                self.stats.tokens += sum(c.tokens for c in future.result())
            self._cond.notify_all()
        self.pool.fill(n, texts)
        if error is not None:
            self._failed(error)
            return
        if not self.answering:
            log.info("teacher %s is back", self.name)
        self.answering, self._backoff = True, 0.5
        self.stats.texts += len(texts)
        for t in texts:
            self.settings.diversity.add(t.text)

    def _texts(self, completions: list[Completion]) -> list[TeacherText]:
        """What the teacher wrote, as the feed keeps it: the teacher's own ids and their distributions where
        it gave them (nothing tokenized again); else the text, stripped, and its ids from the feed's
        tokenizer. An answer that cannot be trained on (ids outside the vocabulary, rows that are not one a
        token, NaN or positive log-probabilities: ``completion_problem``) is dropped and counted."""
        out = []
        settings = self.settings
        for c in completions:
            problem = c.problem or (completion_problem(c, settings.params.logprobs, settings.vocab_size)
                                    if settings.vocab_size else None)
            if problem:
                self.stats.drop(self.name, problem, "a completion")
                continue
            if c.token_ids is not None:
                out.append(TeacherText(c.text, list(c.token_ids), c.logprobs))
                continue
            text = c.text.strip()
            tokenize = self.settings.tokenize
            out.append(TeacherText(text, tokenize([text])[0] if tokenize else None))
        return out

    def _failed(self, error: BaseException) -> None:
        if self._stop.is_set():  # requests cut short by our own stop are not the teacher's failures
            return
        self.stats.errors += 1
        if self.answering:
            log.warning("teacher %s down: %s (retrying with backoff; the feed carries on)", self.name, error)
        self.answering = False
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        close = getattr(self.backend, "close", None)
        if close is not None and self.owns_backend:
            close()


class TeacherPool:
    """The feed's teachers and the pool of texts they share."""

    def __init__(self, texts: TextPool, workers: list[TeacherWorker], diversity: DiversityMeter) -> None:
        self.texts, self.workers, self.diversity = texts, workers, diversity

    @property
    def up(self) -> bool:
        return any(w.up for w in self.workers)

    def wait_ready(self, timeout_s: float) -> bool:
        return self.texts.wait_ready(timeout_s)

    @property
    def tokens(self) -> int:
        return sum(w.stats.tokens for w in self.workers)

    @property
    def generated(self) -> int:
        return sum(w.stats.texts for w in self.workers)

    @property
    def tokens_per_s(self) -> float:
        return sum(w.tokens_per_s for w in self.workers)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
