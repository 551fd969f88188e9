"""Training data: one entry point, ``build_data`` (in ``pipeline``), that turns a data setting into batches
and a held-out set.

A data setting is a corpus (``documents``: a folder, zip, txt, jsonl, parquet, or a Hugging Face dataset), a
weighted list of corpora (``sources``), or a feed server's URL (``remote``). Corpora are tokenized once, in
parallel, into a cache of shards (``token_cache``) and read as blocks of T+1 tokens (``loaders``).

Names are imported when first used, so that reading or tokenizing a corpus (in a worker process, say) does not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "documents": ["CorpusStats", "DataError", "Unit", "corpus_units", "iter_documents", "unit_documents"],
    "held_out": ["held_out_documents", "is_held_out"],
    "reading": ["CorpusReading"],
    "splitting": ["split_paragraphs"],
    "sources": ["DataSource", "corpus_from_env", "is_feed_url", "parse_data_list"],
    "token_cache": ["ShardedTokens", "TokenizedCorpus", "tokenize_corpus"],
    "loaders": ["Batch", "BlockLoader", "DataPosition", "EpochOrder", "MixedBlockLoader", "TokenBlocks",
                "block_span", "eval_blocks", "prefetch"],
    "text_store": ["DocumentStore", "TextStore", "open_text_store"],
    "pipeline": ["DataRequest", "TrainData", "build_data", "data_kind"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
