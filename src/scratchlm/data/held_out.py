"""The held-out split: a document is held out by a hash of its id, so the same documents are held out by
every run, cache, feed and evaluation over a corpus, whatever the seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .documents import iter_documents


def is_held_out(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the evaluation set: a hash of its id, so fixed across runs and seeds."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def held_out_documents(source: str | Path, chunk_chars: int = 8000, eval_fraction: float = 0.005,
                       text_field: str = "text") -> list[str]:
    """The documents a training run on ``source`` holds out (with the same settings), in corpus order."""
    return [text for doc_id, text in iter_documents(source, chunk_chars, text_field=text_field)
            if is_held_out(doc_id, eval_fraction)]
