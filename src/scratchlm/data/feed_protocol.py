"""The feed's HTTP contract: one definition for the server (``feed/app.py``) and its client
(``data/remote.py``).

``GET /v1/batch`` takes a ``BatchQuery`` and answers a ``FeedBatch`` (JSON), or, with ``tokens=1``, a
``TokenBatch``: the same description plus every text's token ids, in a binary body. The body is a safetensors
file (``TOKEN_BATCH_MEDIA_TYPE``): a JSON header then raw little-endian arrays, read without pickle by the
``safetensors`` library the project already uses for weights (and by its Rust, C++ and JavaScript readers);
the description travels in the header's ``__metadata__``. JSON lists would be 3 to 4 times larger for ids, and
25 times for the soft labels that are meant to travel the same way.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from ..config import MAX_SOFT_LABELS

TOKEN_BATCH_MEDIA_TYPE = "application/vnd.scratchlm.token-batch+safetensors"
Source = Literal["corpus", "teacher"]
MAX_WINDOW = 1 << 20
"""The longest corpus window a client may ask for, in tokens (past any block a model here trains on)."""


class BatchQuery(BaseModel):
    """What a client asks of ``/v1/batch`` (its query parameters)."""

    size: int = Field(16, ge=1, description="number of texts (at most the server's --max-batch-size)")
    cursor: str | None = Field(None, max_length=200, description="where the corpus stream resumes")
    rank: int = Field(0, ge=0)
    world_size: int = Field(1, ge=1, le=65536)
    tokens: bool = False
    """Answer with every text's token ids (a ``TokenBatch`` body) instead of the texts."""
    soft_labels: int = Field(0, ge=0, le=MAX_SOFT_LABELS)
    """With the ids (implies ``tokens``): the teacher's top-k at every token that has them (k at most the
    feed's --soft-labels)."""
    window: int = Field(0, ge=0, le=MAX_WINDOW)
    """Each corpus text as one window of this many tokens of the corpus stream (documents end to end, each
    followed by <|endoftext|>) from a seeded place in its document (a trainer's block span; implies
    ``tokens``); 0: whole documents."""


class FeedBatch(BaseModel):
    """Texts from the feed, in order, and where the corpus stream continues."""

    texts: list[str]
    """The texts (empty in a token answer, which carries ids instead)."""
    sources: list[Source]
    ids: list[str]
    """Corpus document ids (``file#chunk``), or ``teacher:...`` for a teacher's text."""
    cursor: str | None
    """Ask again from here for the corpus texts that follow (None for the server's own stream). Opaque: its
    format is the feed's; what a client needs to know of it comes in the fields beside it."""
    epoch: int = 0
    """The passes over the corpus before the texts that follow (a trainer logs it)."""
    tokens: list[int] | None = None
    """Each text's tokens with the ``<|endoftext|>`` that follows it (none after a window that stops inside
    its document), when the feed counted them."""


class HeldOut(BaseModel):
    """``GET /v1/heldout``: fixed held-out documents, never in the training stream."""

    texts: list[str]


LOGPROB_SLACK = 1e-3
"""How far above zero a log-probability may be and still count as one: rounding in a server's float (a
probability of 1 printed as 0.0001). Soft labels above it are refused, at the feed and at the trainer."""


@dataclass
class TokenBatch:
    """A ``FeedBatch`` with every text's token ids: ``token_ids`` holds them end to end, each text followed by
    ``<|endoftext|>`` where it ends (``meta.tokens`` says how many each took). With soft labels, each token's
    row of the teacher's top-k: ``soft_ids`` and ``soft_logprobs`` (total, k), and ``soft_mask`` (total,),
    false where there is none (a corpus text's first token, the <|endoftext|> after a teacher's text, corpus
    text not scored)."""

    meta: FeedBatch
    token_ids: np.ndarray  # (total,) uint16 (uint32 for a vocabulary beyond 65,536)
    soft_ids: np.ndarray | None = None  # (total, k) uint16
    soft_logprobs: np.ndarray | None = None  # (total, k) float16
    soft_mask: np.ndarray | None = None  # (total,) bool

    def teacher_mask(self) -> np.ndarray:
        """(total,) bool: which tokens a teacher wrote."""
        return np.repeat(np.array([s == "teacher" for s in self.meta.sources], dtype=bool),
                         np.asarray(self.meta.tokens, dtype=np.int64))

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        # Ids travel in 16 bits while every one fits, else in 32: none is ever cut.
        largest = max((int(a.max()) for a in (self.token_ids, self.soft_ids) if a is not None and a.size),
                      default=0)
        width = np.uint32 if largest >= 2**16 else np.uint16
        arrays = {"token_ids": np.ascontiguousarray(self.token_ids, dtype=width)}
        if self.soft_ids is not None:
            arrays.update(soft_ids=np.ascontiguousarray(self.soft_ids, dtype=width),
                          soft_logprobs=np.ascontiguousarray(self.soft_logprobs, dtype=np.float16),
                          soft_mask=np.ascontiguousarray(self.soft_mask, dtype=bool))
        return save(arrays, metadata={"feed_batch": self.meta.model_dump_json()})

    @staticmethod
    def from_bytes(body: bytes) -> TokenBatch:
        from safetensors.numpy import load

        (header_len,) = struct.unpack("<Q", body[:8])  # the format's own layout: length, JSON header, data
        meta = json.loads(body[8 : 8 + header_len])["__metadata__"]["feed_batch"]
        batch = FeedBatch.model_validate_json(meta)
        arrays = load(body)
        token_ids = arrays["token_ids"]
        if batch.tokens is None or sum(batch.tokens) != len(token_ids):
            raise ValueError("token batch: the texts' token counts do not add up to the ids sent")
        return TokenBatch(batch, token_ids, arrays.get("soft_ids"), arrays.get("soft_logprobs"),
                          arrays.get("soft_mask"))
