"""How a corpus is read into documents and split, declared once: every command that reads a corpus
(``train``, ``prepare``, ``serve``, ``eval``) takes these settings, so that all of them cut the same documents
and hold out the same ones."""

from __future__ import annotations

from ..config import ConfigBase, Count, OpenShare


class CorpusReading(ConfigBase):
    """The documents of a corpus and its held-out split."""

    chunk_chars: Count = 8000
    """Documents longer than this many characters are cut at paragraph breaks (this decides the documents,
    and so the held-out split: keep it the same for a corpus's training, prepare, serve and eval)."""
    eval_fraction: OpenShare = 0.005
    """Share of documents held out for evaluation (fixed by a hash of each document's id)."""
    text_field: str = "text"
    """The field (JSON lines) or column (parquet, Hugging Face datasets) that holds the text."""
