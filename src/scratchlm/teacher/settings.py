"""How a teacher samples, declared once: ``generate`` and ``build-corpus`` include these settings as they
are, the feed as ``--teacher-*`` (``TeacherSampling``), and the engine's requests (``SamplingParams``) extend
them; so every command starts from the same default of each."""

from __future__ import annotations

from ..config import ConfigBase, Count, NonNegativeInt, Temperature, TopP, prefixed


class Sampling(ConfigBase):
    """How a teacher picks each new token."""

    max_new_tokens: NonNegativeInt = 128
    """Tokens to generate per text (0: none, a request that only scores its prompt)."""
    temperature: Temperature = 0.8
    """Sampling temperature (0 = greedy)."""
    top_k: Count | None = None
    """Sample from the k most likely tokens only."""
    top_p: TopP | None = 0.95
    """Nucleus sampling: the smallest set of tokens holding this much probability."""


TeacherSampling = prefixed(Sampling, "teacher_", "The feed's teachers' sampling: Sampling's as --teacher-*.")
