"""The feed's settings that its parts take whole, each declared once and included by ``ServeConfig``: how the
teachers' share is held (``TeacherMix``, the --teacher-* flags), what soft labels it keeps (``CorpusScoring``)
and how big its answers may be (``FeedLimits``)."""

from __future__ import annotations

from typing import Literal

from ..config import ConfigBase, Count, NonNegative, Positive, Share, SoftLabelCount, prefixed

TeacherMode = Literal["strict", "best-effort"]
ShareUnit = Literal["tokens", "texts"]


class TeacherMix(ConfigBase):
    """How the teachers' share of what is served is held."""

    ratio: Share = 0.0
    """Share of what is served that should come from the teachers, when there are any: of tokens (what a
    trainer eats), or of texts with --teacher-ratio-unit texts."""
    ratio_unit: ShareUnit = "tokens"
    """What --teacher-ratio counts: tokens (each text's tokens and its <|endoftext|>), or texts (the seed's
    meaning; teacher texts are short, so 30% of texts is a few percent of tokens)."""
    mode: TeacherMode = "strict"
    """strict: every response carries the share, waiting for the teachers (up to --teacher-wait-s, then 503);
    best-effort: never waits, fills from the corpus, and warns when the share falls behind."""
    wait_s: Positive = 20.0
    """strict: the longest a request waits for its teacher texts before a 503 with Retry-After."""
    deadline_s: NonNegative = 0.05
    """best-effort: how long a request waits for teacher texts before answering from the corpus instead."""


TeacherMixing = prefixed(TeacherMix, "teacher_", "How the teachers' share of the feed is held (--teacher-*).")


class CorpusScoring(ConfigBase):
    """What a feed keeps of its teachers' distributions."""

    soft_labels: SoftLabelCount = 0
    """The teachers' top-k log-probabilities kept for every token they write (their raw distribution) and,
    with --score-corpus, for corpus text: what /v1/batch?soft_labels=K serves, for K up to this (0: none; 20
    is what vLLM and OpenAI allow by default)."""
    score_corpus: bool = False
    """Score corpus text with the first teacher as it is served (a prefill, no sampling), so that a soft-label
    answer has a teacher's distribution at corpus tokens too (needs --soft-labels)."""


class FeedLimits(ConfigBase):
    """How big the feed's answers are."""

    batch_size: Count = 16
    """Texts per /generate answer."""
    max_batch_size: Count = 1024
    """Largest size a request may ask for."""
