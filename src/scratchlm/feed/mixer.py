"""The feed's mixer: corpus documents and teacher texts served in a chosen share, with Prometheus counters.

The share is counted in tokens by default (``unit="tokens"``: what a trainer eats; teacher texts are short and
corpus documents long, so a share of texts says little about it), or in texts (the seed's meaning). Every text
of an answer goes to the source that is behind its share of everything served so far, so the share holds over
the stream and within one text in every answer. Counting tokens needs the feed's tokenizer (the trainer's);
corpus documents are tokenized as they are served. What happens when the teachers are behind depends on the
mode:

A trainer may ask for each corpus text as one window of its block's span (``window``) rather than the whole
document: the cursor then walks the documents' window slots (``CorpusSource.slots``: each document once per
window of its tokens), and each slot is a window of the corpus stream (documents end to end, each followed
by <|endoftext|>) from a seeded place in its document (seeded by the corpus seed and the slot's place in the
epoch's order, so a replica or a resumed run cuts the same one). A corpus loader's blocks are places
anywhere in the corpus; whole documents gave a short run the blocks of few of them (200 steps of 2,048 tokens
read about 200 documents whole, against thousands of places), and its loss then depended on which documents
it drew (``bench/stream_fairness.py``).

- ``strict``: the request waits for its teacher texts (up to ``wait_s``), then fails with 503 and
  ``Retry-After``; the trainer's client retries, so training runs at the teachers' pace and its data-wait
  figure says so.
- ``best-effort``: the request waits at most ``deadline_s`` and fills the rest from the corpus; when the share
  over the last 1,000 texts is more than 5 points below the target, a warning goes to the log and ``/health``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..data.feed_protocol import FeedBatch, Source, TokenBatch
from ..model.soft_labels import predicted_rows
from ..teacher.protocol import TeacherAnswerError, TopK, topk_problem
from ..tokenizer import Tokenizer
from .corpus import CorpusSource, Cursor
from .settings import CorpusScoring, TeacherMix
from .teachers import TeacherPool, TeacherText

log = logging.getLogger("scratchlm.feed")

SHARE_WINDOW = 1000
SHARE_SLACK = 0.05


class TeacherBehind(RuntimeError):
    """Strict mode: the teachers did not write a response's share in time (the route answers 503)."""


class NoSoftLabels(ValueError):
    """Soft labels asked of a feed that keeps none, or fewer than asked (the route answers 400)."""


@dataclass
class Piece:
    """One text of an answer: where it came from and, when known, its token ids and the teacher's
    distribution at them (one row per token, or, for scored corpus text, one per token after the first and one
    for the <|endoftext|> after it)."""

    text: str
    source: Source
    id: str
    token_ids: list[int] | None = None
    soft: TopK | None = None
    ends: bool = True
    """An <|endoftext|> follows the tokens: the text's end (a window of the corpus stream carries its own)."""
    place: tuple[int, int] | None = None
    """A corpus text: its place in the corpus walk (epoch, position), which seeds where its window starts."""
    doc: int | None = None
    """A corpus text: its document's index in the corpus."""

    @property
    def length(self) -> int:
        """Tokens on the wire: the ids and the <|endoftext|> after them, if the text ends there."""
        return len(self.token_ids) + self.ends

    def served(self, eot: int) -> list[int]:
        return [*self.token_ids, eot] if self.ends else list(self.token_ids)



class Feed:
    """Corpus + optional teachers, mixed to a target share, with counters for /metrics."""

    def __init__(self, corpus: CorpusSource, teachers: TeacherPool | None = None,
                 mix: TeacherMix | None = None, tokenizer: Tokenizer | None = None,
                 soft: CorpusScoring | None = None) -> None:
        mix, soft = mix or TeacherMix(), soft or CorpusScoring()
        self.corpus, self.teachers, self.mix, self.tokenizer = corpus, teachers, mix, tokenizer
        self.soft = soft
        if self.mixing and mix.ratio_unit == "tokens" and tokenizer is None:
            raise ValueError("a share of tokens needs the feed's tokenizer")
        self._texts = {"corpus": 0, "teacher": 0}
        self._tokens = {"corpus": 0, "teacher": 0}
        self._recent: deque[tuple[bool, int]] = deque(maxlen=SHARE_WINDOW)  # (a teacher's?, its units)
        self.warning: str | None = None
        self._lock = threading.Lock()  # one answer composed at a time: the shares and the shared stream
        self.registry = CollectorRegistry()
        self.texts_served = Counter("scratchlm_texts_served", "Texts served", ["source"],
                                    registry=self.registry)
        self.bytes_served = Counter("scratchlm_bytes_served", "UTF-8 bytes of text served", ["source"],
                                    registry=self.registry)
        self.tokens_served = Counter("scratchlm_tokens_served", "Tokens served, each text's <|endoftext|> "
                                     "included (counted when the feed tokenizes: a share of tokens, or ids "
                                     "asked for)", ["source"], registry=self.registry)
        self.errors = Counter("scratchlm_request_errors", "Requests answered with an error", ["status"],
                              registry=self.registry)
        self._gauges()

    @property
    def mixing(self) -> bool:
        return self.teachers is not None and self.mix.ratio > 0

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
        depth.labels("corpus").set_function(lambda: len(corpus.texts))  # on disk: always all of it
        depth.labels("teacher").set_function(lambda: len(teachers.texts.texts) if teachers else 0)
        diversity = (lambda k: teachers.diversity.summary()[k]) if teachers else (lambda k: 0)
        for name, doc, value in [
            ("texts_generated", "Texts the teachers have written since start",
             lambda: teachers.generated if teachers else 0),
            ("tokens", "Tokens the teachers have generated", lambda: teachers.tokens if teachers else 0),
            ("tokens_per_second", "Teacher tokens per second of generation, all teachers",
             lambda: teachers.tokens_per_s if teachers else 0),
            ("up", "1 when at least one teacher answers", lambda: 1 if teachers and teachers.up else 0),
            ("ratio_realised", "Share of what was served that came from the teachers, in the unit of "
             "--teacher-ratio-unit", self.realised_ratio),
            ("token_share_realised", "Share of the tokens served that the teachers wrote",
             lambda: self._share(self._tokens)),
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
        if teachers:
            registry.register(_DroppedAnswers(teachers))

    @staticmethod
    def _share(counts: dict[str, int]) -> float:
        total = counts["corpus"] + counts["teacher"]
        return counts["teacher"] / total if total else 0.0

    def realised_ratio(self) -> float:
        """The teachers' share of everything served so far, in the unit the target is set in."""
        return self._share(self._tokens if self.mix.ratio_unit == "tokens" else self._texts)

    def _compose(self, n: int, cursor: Cursor, rank: int, world_size: int,
                 window: int = 0) -> tuple[list[Piece], Cursor]:
        """n texts in order, each from the source behind its share (module docstring), and the corpus cursor
        after them (corpus texts cut to a ``window`` of tokens, where asked). Strict mode raises
        ``TeacherBehind`` (the teacher texts taken go back) when the teachers do not deliver in time. Called
        under the lock."""
        mix, teachers, counting = self.mix, self.teachers, self.mix.ratio_unit == "tokens"
        teacher, total = (self._tokens if counting else self._texts)["teacher"], sum(
            (self._tokens if counting else self._texts).values())
        deadline = time.monotonic() + (mix.wait_s if mix.mode == "strict" else mix.deadline_s)
        walk, after = self.corpus.walk(cursor, rank, world_size, window), cursor
        pieces: list[Piece] = []
        taken: list[TeacherText] = []
        behind = False  # best-effort: once the teachers miss, the rest of the answer is corpus text
        for _ in range(n):
            if self.mixing and not behind and teacher < mix.ratio * (total + 1):
                text = teachers.texts.take_one(deadline)
                if text is not None:
                    taken.append(text)
                    pieces.append(Piece(text.text, "teacher", f"teacher:{time.time_ns()}:{len(taken)}",
                                        text.token_ids, text.soft))
                    units = text.tokens if counting else 1
                    teacher, total = teacher + units, total + units
                    continue
                if mix.mode == "strict":
                    teachers.texts.put_back(taken)
                    raise TeacherBehind(f"the teachers are behind: no teacher text was ready after "
                                        f"{mix.wait_s:.0f} s for this answer's share (strict mode); retry, "
                                        "or serve with --teacher-mode best-effort")
                behind = True
            index, place, after = next(walk)
            text = self.corpus.texts[index]
            piece = Piece(text, "corpus", self.corpus.ids[index], place=place, doc=index)
            if counting and self.mixing:
                self._cut_window(piece, window)
                if piece.token_ids is None:
                    piece.token_ids = self.tokenizer.encode(text)
            pieces.append(piece)
            total += piece.length if piece.token_ids is not None else 1
        return pieces, after

    def _cut_window(self, piece: Piece, window: int) -> None:
        """A corpus piece as one window of ``window`` tokens of the corpus stream (documents end to end, each
        followed by <|endoftext|>, as the corpus loader reads them) from a seeded place inside its document
        (``CorpusSource.window``). Every window is then whole (the loader's blocks stay aligned with them) and
        every boundary between two documents has its <|endoftext|> (a window cut short would join the next
        one's text without it)."""
        if window > 0 and piece.place is not None:  # asked, and corpus text (a teacher's text stays whole)
            piece.token_ids = self.corpus.window(piece.doc, piece.place, window, self.tokenizer)
            piece.ends = False

    def _count(self, pieces: list[Piece]) -> None:
        """Count an answer's texts (and the tokens of those already tokenized); called under the lock."""
        texts, text_bytes = defaultdict(int), defaultdict(int)
        for p in pieces:
            texts[p.source] += 1
            text_bytes[p.source] += len(p.text.encode("utf-8"))
            units = p.length if p.token_ids is not None else 0
            self._recent.append((p.source == "teacher", units if self.mix.ratio_unit == "tokens" else 1))
        for source, n in texts.items():  # one metric update a source and answer, not one a text
            self._texts[source] += n
            self.texts_served.labels(source).inc(n)
            self.bytes_served.labels(source).inc(text_bytes[source])
        self._count_tokens([p for p in pieces if p.token_ids is not None])
        if self.teachers is not None and self.mix.mode == "best-effort":
            self._watch_share()

    def _count_tokens(self, pieces: list[Piece]) -> None:
        for p in pieces:
            self._tokens[p.source] += p.length
            self.tokens_served.labels(p.source).inc(p.length)

    def _watch_share(self) -> None:
        teacher = sum(units for is_teacher, units in self._recent if is_teacher)
        recent_share = teacher / max(1, sum(units for _, units in self._recent))
        behind = len(self._recent) == SHARE_WINDOW and recent_share < self.mix.ratio - SHARE_SLACK
        if behind and self.warning is None:
            self.warning = (f"teacher share over the last {SHARE_WINDOW:,} texts is {recent_share:.1%} of "
                            f"{self.mix.ratio_unit}, target {self.mix.ratio:.0%}: the teachers are behind, "
                            "and "
                            "best-effort mode serves corpus text in their place")
            log.warning(self.warning)
        elif not behind and self.warning is not None:
            log.info("teacher share back near its target (%.1f%% over the last %d texts)", 100 * recent_share,
                     SHARE_WINDOW)
            self.warning = None

    def batch(self, n: int, cursor: Cursor | None, rank: int = 0, world_size: int = 1,
              tokens: bool = False, soft_labels: int = 0, window: int = 0) -> FeedBatch | TokenBatch:
        """n texts: the teachers' share, the rest from the corpus (from ``cursor``, or the server's own
        stream); with ``tokens``, their token ids instead of their texts, and with ``soft_labels`` k, the
        teachers' top-k at every token that has one; with ``window``, each corpus text as one window of that
        many tokens (module docstring)."""
        if soft_labels > self.soft.soft_labels:
            raise NoSoftLabels(f"soft_labels {soft_labels} asked of a feed that keeps "
                               + (f"the top {self.soft.soft_labels}" if self.soft.soft_labels else "none")
                               + ": start it with --soft-labels K (and --score-corpus for corpus text)")
        tokens = tokens or soft_labels > 0 or window > 0
        if window:
            if cursor is None:
                raise ValueError("windows are read from a cursor (the server's own stream walks documents)")
            self.corpus.slots(window, self.tokenizer)  # made once: the documents tokenized
        with self._lock:
            pieces, after = self._compose(n, cursor or self.corpus.stream, rank, world_size, window)
            if cursor is None:
                self.corpus.stream = after
            self._count(pieces)
        if tokens:  # outside the lock: other answers are composed meanwhile
            fresh = [p for p in pieces if p.token_ids is None]
            for p in fresh:
                self._cut_window(p, window)  # a slice of the corpus's tokens, nothing to tokenize
            self._tokenize([p for p in fresh if p.token_ids is None])
            with self._lock:
                self._count_tokens(fresh)
        meta = FeedBatch(texts=[] if tokens else [p.text for p in pieces], sources=[p.source for p in pieces],
                         ids=[p.id for p in pieces],
                         cursor=after.encode(self.corpus.fingerprint_for(window)) if cursor is not None
                         else None,
                         epoch=after.epoch, tokens=[p.length for p in pieces]
                         if all(p.token_ids is not None for p in pieces) else None)
        if not tokens:
            return meta
        eot = self.tokenizer.eot_id
        ids = np.fromiter((t for p in pieces for t in p.served(eot)), dtype=np.uint32, count=sum(meta.tokens))
        if not soft_labels:
            return TokenBatch(meta, ids)
        if self.soft.score_corpus:
            self._score([p for p in pieces if p.source == "corpus"])
        return TokenBatch(meta, ids, *_soft_rows(pieces, soft_labels))

    def _score(self, pieces: list[Piece]) -> None:
        """The first teacher's distribution over each corpus piece's tokens as served (one scoring request
        for all: the teacher batches them with what else it is doing)."""
        if not pieces:
            return
        worker = self.teachers.workers[0]
        eot, k = self.tokenizer.eot_id, self.soft.soft_labels
        try:
            scored = worker.backend.score([p.served(eot) for p in pieces], k)
        except TeacherAnswerError as err:  # an answer that cannot be read: the texts go unlabelled
            for _ in pieces:
                worker.stats.drop(worker.name, str(err), "a corpus text's scores")
            return
        except Exception as err:  # a teacher down: the client retries, as when a strict share lags
            raise TeacherBehind(f"the teacher could not score corpus text ({type(err).__name__}: {err})") \
                from None
        for p, rows in zip(pieces, scored, strict=True):
            # the rows of every token served but the first
            problem = topk_problem(rows, p.length - 1, k, self.tokenizer.vocab_size)
            if problem:
                worker.stats.drop(worker.name, problem, "a corpus text's scores")
                continue
            p.soft = rows

    def _tokenize(self, pieces: list[Piece]) -> None:
        if pieces:
            if self.tokenizer is None:
                raise ValueError("this feed has no tokenizer: it cannot serve token ids")
            for p, ids in zip(pieces, self.tokenizer.encode_batch([p.text for p in pieces]), strict=True):
                p.token_ids = ids

    def health(self) -> dict:
        state = {"status": "ok", "documents": len(self.corpus.texts),
                 "tokenizer": self.tokenizer.digest if self.tokenizer else None}
        if self.teachers is None:
            return {**state, "teacher": "none"}
        state.update(teacher="up" if self.teachers.up else "down", teacher_mode=self.mix.mode,
                     teacher_ratio=self.mix.ratio, teacher_ratio_unit=self.mix.ratio_unit,
                     teacher_ratio_realised=round(self.realised_ratio(), 4),
                     teacher_token_share_realised=round(self._share(self._tokens), 4),
                     teacher_text_share_realised=round(self._share(self._texts), 4),
                     teachers=[w.health() for w in self.teachers.workers])
        return {**state, "warning": self.warning} if self.warning else state


class _DroppedAnswers(Collector):
    """``scratchlm_teacher_answers_dropped_total{teacher, reason}``: answers refused where they entered the
    feed (read from the workers' counts when scraped)."""

    def __init__(self, teachers: TeacherPool) -> None:
        self.teachers = teachers

    def collect(self):
        family = CounterMetricFamily(
            "scratchlm_teacher_answers_dropped", "Teacher answers refused where they entered the feed (ids "
            "outside the vocabulary, NaN or positive log-probabilities, rows that are not one a token, keys "
            "that are no ids)", labels=["teacher", "reason"])
        for worker in self.teachers.workers:
            for reason, n in list(worker.stats.dropped.items()):
                family.add_metric([worker.name, reason], n)
        yield family


def _soft_rows(pieces: list[Piece], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each token's row of the teachers' top-k, end to end as the token ids are (``Piece.served``): ids,
    log-probabilities and the mask of the rows that hold one."""
    total = sum(p.length for p in pieces)
    ids = np.zeros((total, k), np.uint32)
    logprobs = np.zeros((total, k), np.float32)
    mask = np.zeros(total, bool)
    at = 0
    for p in pieces:
        n = p.length
        if p.soft is not None and len(p.soft):
            # A teacher's text: a row for each of its tokens (the <|endoftext|> after them was never sampled).
            # Scored corpus text, the text and its <|endoftext|> read alone: its predicted rows.
            own = slice(0, len(p.soft)) if p.source == "teacher" else predicted_rows(n)
            rows = slice(at + own.start, at + own.stop)
            ids[rows], logprobs[rows], mask[rows] = p.soft.ids[:, :k], p.soft.logprobs[:, :k], True
        at += n
    return ids, logprobs, mask
