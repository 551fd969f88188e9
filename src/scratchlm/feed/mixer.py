"""The feed's mixer: corpus documents and teacher texts served in a chosen ratio, with Prometheus counters.

Each response's teacher share is the target ratio applied to everything served so far (rounded), so shares
hold over the stream and within a text of the target in every response. What happens when the teachers are
behind depends on the mode:

- ``strict``: the request waits for its share (up to ``wait_s``), then fails with 503 and ``Retry-After``; the
  trainer's client retries, so training runs at the teachers' pace and its data-wait figure says so.
- ``best-effort``: the request waits at most ``deadline_s`` and fills the rest from the corpus; when the share
  over the last 1,000 texts is more than 5 points below the target, a warning goes to the log and ``/health``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from .corpus import CorpusSource, Cursor
from .teachers import TeacherPool

log = logging.getLogger("scratchlm.feed")

TeacherMode = Literal["strict", "best-effort"]
SHARE_WINDOW = 1000
SHARE_SLACK = 0.05


class TeacherBehind(RuntimeError):
    """Strict mode: the teachers did not write a response's share in time (the route answers 503)."""


@dataclass(frozen=True)
class MixSettings:
    ratio: float = 0.0
    """Share of served texts that come from the teachers."""
    mode: TeacherMode = "strict"
    wait_s: float = 20.0
    """Strict: the longest a request waits for its teacher texts."""
    deadline_s: float = 0.05
    """Best-effort: the longest a request waits for the first teacher text."""


class Feed:
    """Corpus + optional teachers, mixed to a target ratio, with counters for /metrics."""

    def __init__(self, corpus: CorpusSource, teachers: TeacherPool | None = None,
                 mix: MixSettings = MixSettings()) -> None:
        self.corpus, self.teachers, self.mix = corpus, teachers, mix
        self._served = {"corpus": 0, "teacher": 0}
        self._recent: deque[bool] = deque(maxlen=SHARE_WINDOW)  # was each recent text the teacher's
        self.warning: str | None = None
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
        """Gauges read when /metrics is scraped: the corpus, the teachers together, and each teacher."""
        registry, corpus, teachers = self.registry, self.corpus, self.teachers
        skipped = Gauge("scratchlm_corpus_files_skipped", "Corpus files skipped, by reason", ["reason"],
                        registry=registry)
        for reason, n in corpus.stats.skipped.items():
            skipped.labels(reason).set(n)
        Gauge("scratchlm_corpus_documents", "Training documents in the corpus", registry=registry).set(
            len(corpus.texts))
        depth = Gauge("scratchlm_buffer_depth", "Texts ready to serve, per source", ["source"],
                      registry=registry)
        depth.labels("corpus").set_function(lambda: len(corpus.texts))  # in memory: always all of it
        depth.labels("teacher").set_function(lambda: len(teachers.texts.texts) if teachers else 0)
        diversity = (lambda k: teachers.diversity.summary()[k]) if teachers else (lambda k: 0)
        for name, doc, value in [
            ("texts_generated", "Texts the teachers have written since start",
             lambda: teachers.generated if teachers else 0),
            ("tokens", "Tokens the teachers have generated", lambda: teachers.tokens if teachers else 0),
            ("tokens_per_second", "Teacher tokens per second of generation, all teachers",
             lambda: teachers.tokens_per_s if teachers else 0),
            ("up", "1 when at least one teacher answers", lambda: 1 if teachers and teachers.up else 0),
            ("ratio_realised", "Share of served texts that came from the teachers", self.realised_ratio),
        ] + [(key, f"Teacher texts: {key.replace('_', ' ')}", lambda k=key: diversity(k))
             for key in ("exact_duplicate_rate", "near_duplicate_rate", "top_opening_share")]:
            Gauge(f"scratchlm_teacher_{name}", doc, registry=registry).set_function(value)
        per_teacher = [("up", "1 when this teacher answers", lambda w: int(w.up)),
                       ("tokens_per_second", "This teacher's tokens per second", lambda w: w.tokens_per_s),
                       ("in_flight", "Sequences sent to this teacher, not yet back", lambda w: w.in_flight)]
        for name, doc, value in per_teacher:
            gauge = Gauge(f"scratchlm_teacher_backend_{name}", doc, ["teacher"], registry=registry)
            for worker in teachers.workers if teachers else []:
                gauge.labels(worker.name).set_function(lambda w=worker, value=value: value(w))

    def realised_ratio(self) -> float:
        total = sum(self._served.values())
        return self._served["teacher"] / total if total else 0.0

    def _teacher_texts(self, n: int) -> list[str]:
        """This response's teacher share (module docstring); raises ``TeacherBehind`` in strict mode."""
        if self.teachers is None or self.mix.ratio <= 0:
            return []
        with self._lock:
            total = sum(self._served.values()) + n
            want = min(n, max(0, round(self.mix.ratio * total) - self._served["teacher"]))
        if self.mix.mode == "best-effort":
            return self.teachers.take(want, self.mix.deadline_s, exact=False)
        texts = self.teachers.take(want, self.mix.wait_s, exact=True)
        if len(texts) < want:
            raise TeacherBehind(f"the teachers are behind: fewer than the {want} teacher texts this response "
                                f"needs were ready after {self.mix.wait_s:.0f} s (strict mode); retry, or "
                                "serve with --teacher-mode best-effort")
        return texts

    def _count(self, teacher_texts: list[str], corpus_texts: list[str]) -> None:
        with self._lock:
            self._served["teacher"] += len(teacher_texts)
            self._served["corpus"] += len(corpus_texts)
            self._recent.extend([True] * len(teacher_texts) + [False] * len(corpus_texts))
            recent_share = sum(self._recent) / len(self._recent) if self._recent else 0.0
        for source, texts in (("teacher", teacher_texts), ("corpus", corpus_texts)):
            self.texts_served.labels(source).inc(len(texts))
            self.bytes_served.labels(source).inc(sum(len(t.encode("utf-8")) for t in texts))
        if self.teachers is not None and self.mix.mode == "best-effort":
            self._watch_share(recent_share)

    def _watch_share(self, recent_share: float) -> None:
        behind = len(self._recent) == SHARE_WINDOW and recent_share < self.mix.ratio - SHARE_SLACK
        if behind and self.warning is None:
            self.warning = (f"teacher share over the last {SHARE_WINDOW:,} texts is {recent_share:.1%}, "
                            f"target {self.mix.ratio:.0%}: the teachers are behind, and best-effort mode "
                            "serves corpus text in their place")
            log.warning(self.warning)
        elif not behind and self.warning is not None:
            log.info("teacher share back near its target (%.1f%% over the last %d texts)", 100 * recent_share,
                     SHARE_WINDOW)
            self.warning = None

    def batch(self, n: int, cursor: Cursor | None, rank: int = 0, world_size: int = 1) -> dict:
        """n texts: the teachers' share, the rest from the corpus (from ``cursor``, or the server's own
        stream)."""
        teacher_texts = self._teacher_texts(n)  # first: a strict refusal must not move the corpus stream
        n_corpus = n - len(teacher_texts)
        if cursor is None:
            indices, after = self.corpus.take_shared(n_corpus), None
        else:
            indices, after = self.corpus.take(cursor, n_corpus, rank, world_size)
        corpus_texts = [self.corpus.texts[i] for i in indices]
        self._count(teacher_texts, corpus_texts)
        # Teacher texts go last so that a batch's corpus part is the same on replay from its cursor.
        return {
            "texts": corpus_texts + teacher_texts,
            "sources": ["corpus"] * len(corpus_texts) + ["teacher"] * len(teacher_texts),
            "ids": [self.corpus.ids[i] for i in indices] + [f"teacher:{time.time_ns()}:{k}"
                                                              for k in range(len(teacher_texts))],
            "cursor": after.encode(self.corpus.fingerprint) if after else None,
        }

    def health(self) -> dict:
        state = {"status": "ok", "documents": len(self.corpus.texts)}
        if self.teachers is None:
            return {**state, "teacher": "none"}
        state.update(teacher="up" if self.teachers.up else "down", teacher_mode=self.mix.mode,
                     teacher_ratio=self.mix.ratio, teacher_ratio_realised=round(self.realised_ratio(), 4),
                     teachers=[w.health() for w in self.teachers.workers])
        return {**state, "warning": self.warning} if self.warning else state
