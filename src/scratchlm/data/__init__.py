"""Training data: one entry point, ``pipeline.build_data``, that turns a data setting into batches and a
held-out set.

A data setting is a corpus (``documents``: a folder, zip, txt, jsonl, parquet, or a Hugging Face dataset), a
weighted list of corpora (``sources``), or a feed server's URL (``remote``). Corpora are tokenized once, in
parallel, into a cache of shards (``token_cache``) and read as blocks of T+1 tokens (``loaders``).

The names below come from modules that need no torch, so that reading or tokenizing a corpus (in a worker
process, say) does not import it; the loaders and the pipeline, which do, are imported from their modules
(``from scratchlm.data.pipeline import build_data``).
"""

from __future__ import annotations

from .blocks import block_span
from .documents import CorpusStats, DataError, Unit, corpus_units, iter_documents, unit_documents
from .held_out import held_out_documents, is_held_out
from .reading import CorpusReading, FeedReading, SoftLabelReading
from .sources import DataSource, corpus_from_env, is_feed_url, parse_data_list
from .splitting import split_paragraphs
from .text_store import DocumentStore, TextStore, open_text_store
from .token_cache import ShardedTokens, TokenizedCorpus, tokenize_corpus

__all__ = ["CorpusReading", "CorpusStats", "DataError", "DataSource", "DocumentStore", "FeedReading",
           "ShardedTokens", "SoftLabelReading", "TextStore", "TokenizedCorpus", "Unit", "block_span",
           "corpus_from_env", "corpus_units", "held_out_documents", "is_feed_url", "is_held_out",
           "iter_documents", "open_text_store", "parse_data_list", "split_paragraphs", "tokenize_corpus",
           "unit_documents"]
