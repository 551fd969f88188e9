"""How a corpus is read into documents and split, declared once: every command that reads a corpus
(``train``, ``prepare``, ``serve``, ``eval``) takes these settings, so that all of them cut the same documents
and hold out the same ones."""

from __future__ import annotations

from ..config import ConfigBase, Count, NonNegativeInt, OpenShare, SoftLabelCount
from .blocks import FEED_SHUFFLE_TOKENS, block_span


class CorpusReading(ConfigBase):
    """The documents of a corpus and its held-out split."""

    chunk_chars: Count = 8000
    """Documents longer than this many characters are cut at paragraph breaks (this decides the documents,
    and so the held-out split: keep it the same for a corpus's training, prepare, serve and eval)."""
    eval_fraction: OpenShare = 0.005
    """Share of documents held out for evaluation (fixed by a hash of each document's id)."""
    text_field: str = "text"
    """The field (JSON lines) or column (parquet, Hugging Face datasets) that holds the text."""


class FeedReading(ConfigBase):
    """How a training run reads a feed server."""

    feed_api_key_file: str | None = None
    """File holding the feed's API key (else $SCRATCHLM_API_KEY)."""
    feed_texts_per_request: Count = 16
    """Texts asked of the feed per request (4 requests are prefetched)."""
    feed_shuffle_tokens: NonNegativeInt = FEED_SHUFFLE_TOKENS
    """Training from a feed: tokens kept in a shuffle buffer, from which each batch is drawn at random (so a
    batch holds blocks of many documents, as from a corpus, at any block size). Filled before the first step
    (a feed with no teacher serves 1M tokens in seconds; with one, at its pace), never beyond what the rest
    of the run trains on. Memory: 5 bytes a token, and 4k + 1 more with --soft-labels k (1M tokens: 5 MB,
    91 MB at k 20). 0: no shuffling."""
    feed_whole_documents: bool = False
    """Read every corpus text the feed serves whole. By default each is one window of a block's span at a
    seeded place in its document, as a corpus run's blocks are places in the corpus: a run then reads as many
    documents as a corpus run does, not the few whose every token it takes (the feed's mixer docstring).
    Teacher texts are always whole."""
    feed_shuffle_blocks: NonNegativeInt | None = None
    """Replaced by --feed-shuffle-tokens (what a buffer of blocks mixes shrank with the block size); when
    given, the buffer holds this many blocks instead."""

    def shuffle_budget(self, block_size: int) -> int:
        """The shuffle buffer in tokens (--feed-shuffle-blocks, when given, in blocks of ``block_size``)."""
        if self.feed_shuffle_blocks is not None:
            return self.feed_shuffle_blocks * block_span(block_size)
        return self.feed_shuffle_tokens


class SoftLabelReading(ConfigBase):
    """Which of a teacher's soft labels a training run reads."""

    soft_labels: SoftLabelCount = 0
    """The teacher's top-k log-probabilities to read beside every token (0: none): from a feed started with
    --soft-labels K (corpus text too with --score-corpus), or a corpus prepared with `scratchlm prepare
    --soft-labels K`. At most the K they were made with."""
    soft_label_teacher: str | None = None
    """A corpus run: whose prepared soft labels to read, as its spec was given to prepare (default: the only
    set prepared for the corpus)."""
