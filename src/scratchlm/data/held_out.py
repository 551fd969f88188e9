"""The held-out split: a document is held out by a hash of its id, so the same documents are held out by
every run, cache, feed and evaluation over a corpus, whatever the seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .documents import iter_documents
from .reading import CorpusReading


def is_held_out(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the evaluation set: a hash of its id, so fixed across runs and seeds."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def held_out_documents(source: str | Path, reading: CorpusReading | None = None) -> list[str]:
    """The documents a training run on ``source`` holds out (read with the same settings), in corpus
    order."""
    reading = reading or CorpusReading()
    return [text for doc_id, text in iter_documents(source, reading)
            if is_held_out(doc_id, reading.eval_fraction)]
