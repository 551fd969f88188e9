"""The feed's mixer: corpus documents and teacher texts served in a chosen ratio, with Prometheus counters.

Teacher texts come from a bounded buffer that a background thread keeps filled (``TeacherBuffer``); a request
takes its teacher share from it within a deadline and the rest from the corpus, so a slow or dead teacher
never stalls the feed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..teacher.diversity import DiversityMeter
from .corpus import CorpusSource, Cursor

log = logging.getLogger("scratchlm.feed")


@dataclass
class TeacherStats:
    """What the feed's teacher has written: tokens, seconds spent generating, and how repetitive it is."""

    tokens: int = 0
    busy_s: float = 0.0
    diversity: DiversityMeter = field(default_factory=DiversityMeter)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s else 0.0


class TeacherProducer:
    """``produce(n)`` for the teacher buffer: n prompts → the teacher's backend → texts, counted in
    ``stats``."""

    def __init__(self, backend, prompts, params, stats: TeacherStats) -> None:
        self.backend, self.prompts, self.params, self.stats = backend, prompts, params, stats

    def __call__(self, n: int) -> list[str]:
        t0 = time.perf_counter()
        completions = self.backend.complete(self.prompts.sample(n), self.params)
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.tokens += sum(c.tokens for c in completions)
        texts = [c.text.strip() for c in completions if c.text.strip()]
        for t in texts:
            self.stats.diversity.add(t)
        return texts


class TeacherBuffer:
    """A bounded buffer of teacher texts, filled by a background producer thread.

    ``produce(n)`` is any callable returning up to n fresh texts (a local model, an OpenAI-compatible
    server...). If it raises, the teacher is marked down and retried with backoff; the feed goes on from the
    corpus.
    """

    def __init__(self, produce: Callable[[int], list[str]], capacity: int, chunk: int = 16,
                 stall_s: float = 120.0) -> None:
        self.produce, self.capacity, self.chunk, self.stall_s = produce, capacity, chunk, stall_s
        self.texts: deque[str] = deque()
        self.cond = threading.Condition()
        self.answering = True  # the last call returned texts
        self.busy_since: float | None = None
        self.generated = 0
        self.errors = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="scratchlm-teacher")
        self.thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            with self.cond:
                while len(self.texts) >= self.capacity and not self._stop.is_set():
                    self.cond.wait(0.5)
            self.busy_since = time.monotonic()
            try:
                new = self.produce(self.chunk)
            except Exception as err:  # the teacher's own failure: keep serving from the corpus
                self.busy_since = None
                self.errors += 1
                if self.answering:
                    log.warning("teacher down: %s", err)
                self.answering = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.busy_since = None
            if not self.up:
                log.info("teacher back")
            self.answering, backoff = True, 0.5
            with self.cond:
                self.texts.extend(t for t in new if t)
                self.generated += len(new)
                self.cond.notify_all()

    @property
    def up(self) -> bool:
        """Answering, and not stuck in a call for longer than ``stall_s`` (a hung teacher counts as down)."""
        busy = self.busy_since
        return self.answering and (busy is None or time.monotonic() - busy < self.stall_s)

    def take(self, n: int, deadline_s: float) -> list[str]:
        """Up to n buffered texts, waiting at most ``deadline_s`` for the first one."""
        with self.cond:
            if not self.texts:
                self.cond.wait(deadline_s)
            out = [self.texts.popleft() for _ in range(min(n, len(self.texts)))]
            self.cond.notify_all()
            return out

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the first texts are buffered (a cold teacher loads and warms up first); False on
        timeout."""
        with self.cond:
            return bool(self.cond.wait_for(lambda: self.texts or self._stop.is_set(),
                                           timeout_s) and self.texts)

    def stop(self) -> None:
        self._stop.set()
        with self.cond:
            self.cond.notify_all()


class Feed:
    """Corpus + optional teacher, mixed to a target ratio, with counters for /metrics."""

    def __init__(self, corpus: CorpusSource, teacher: TeacherBuffer | None = None, teacher_ratio: float = 0.0,
                 teacher_deadline_s: float = 0.05, teacher_stats: TeacherStats | None = None) -> None:
        self.corpus, self.teacher, self.teacher_ratio = corpus, teacher, teacher_ratio
        self.teacher_deadline_s = teacher_deadline_s
        self.teacher_stats = teacher_stats or TeacherStats()
        self._served = {"corpus": 0, "teacher": 0}
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.texts_served = Counter("scratchlm_texts_served", "Texts served", ["source"],
                                    registry=self.registry)
        self.bytes_served = Counter("scratchlm_bytes_served", "UTF-8 bytes of text served", ["source"],
                                    registry=self.registry)
        self.errors = Counter("scratchlm_request_errors", "Requests answered with an error", ["status"],
                              registry=self.registry)
        self._gauges()

    def _gauges(self) -> None:
        """Gauges read when /metrics is scraped."""
        registry, corpus, teacher, stats = self.registry, self.corpus, self.teacher, self.teacher_stats
        skipped = Gauge("scratchlm_corpus_files_skipped", "Corpus files skipped, by reason", ["reason"],
                        registry=registry)
        for reason, n in corpus.stats.skipped.items():
            skipped.labels(reason).set(n)
        Gauge("scratchlm_corpus_documents", "Training documents in the corpus", registry=registry).set(
            len(corpus.texts))
        depth = Gauge("scratchlm_buffer_depth", "Texts ready to serve, per source", ["source"],
                      registry=registry)
        depth.labels("corpus").set_function(lambda: len(corpus.texts))  # in memory: always all of it
        depth.labels("teacher").set_function(lambda: len(teacher.texts) if teacher else 0)
        for name, doc, value in [
            ("texts_generated", "Texts the teacher has produced since start",
             lambda: teacher.generated if teacher else 0),
            ("tokens", "Tokens the teacher has generated", lambda: stats.tokens),
            ("tokens_per_second", "Teacher tokens per second of generation", lambda: stats.tokens_per_s),
            ("up", "1 when the teacher answers", lambda: 1 if teacher and teacher.up else 0),
            ("ratio_realised", "Share of served texts that came from the teacher", self.realised_ratio),
        ] + [(key, f"Teacher texts: {key.replace('_', ' ')}", lambda k=key: stats.diversity.summary()[k])
             for key in ("exact_duplicate_rate", "near_duplicate_rate", "top_opening_share")]:
            Gauge(f"scratchlm_teacher_{name}", doc, registry=registry).set_function(value)

    def realised_ratio(self) -> float:
        total = sum(self._served.values())
        return self._served["teacher"] / total if total else 0.0

    def _teacher_share(self, n: int) -> list[str]:
        if self.teacher is None or self.teacher_ratio <= 0:
            return []
        with self._lock:
            total = sum(self._served.values()) + n
            want = max(0, round(self.teacher_ratio * total) - self._served["teacher"])
        return self.teacher.take(min(want, n), self.teacher_deadline_s) if want else []

    def _count(self, source: str, texts: list[str]) -> None:
        with self._lock:
            self._served[source] += len(texts)
        self.texts_served.labels(source).inc(len(texts))
        self.bytes_served.labels(source).inc(sum(len(t.encode("utf-8")) for t in texts))

    def batch(self, n: int, cursor: Cursor | None, rank: int = 0, world_size: int = 1) -> dict:
        """n texts: the teacher's share, the rest from the corpus (from ``cursor``, or the server's own
        stream)."""
        teacher_texts = self._teacher_share(n)
        n_corpus = n - len(teacher_texts)
        if cursor is None:
            indices, after = self.corpus.take_shared(n_corpus), None
        else:
            indices, after = self.corpus.take(cursor, n_corpus, rank, world_size)
        corpus_texts = [self.corpus.texts[i] for i in indices]
        self._count("corpus", corpus_texts)
        self._count("teacher", teacher_texts)
        # Teacher texts go last so that a batch's corpus part is the same on replay from its cursor.
        return {
            "texts": corpus_texts + teacher_texts,
            "sources": ["corpus"] * len(corpus_texts) + ["teacher"] * len(teacher_texts),
            "ids": [self.corpus.ids[i] for i in indices] + [f"teacher:{time.time_ns()}:{k}"
                                                              for k in range(len(teacher_texts))],
            "cursor": after.encode(self.corpus.fingerprint) if after else None,
        }

    def health(self) -> dict:
        teacher = "none" if self.teacher is None else ("up" if self.teacher.up else "down")
        return {"status": "ok", "documents": len(self.corpus.texts), "teacher": teacher}
