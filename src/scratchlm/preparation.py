"""``scratchlm prepare``: get a corpus ready before the GPU hours start: tokenized into the cache (what a
training run would do first), checked, and, with a teacher, scored into soft-label shards beside it."""

from __future__ import annotations

import json
import sys

from .config import Count, DeviceSpec, SoftLabelCount
from .data.documents import DataError
from .data.reading import CorpusReading


class PrepareConfig(CorpusReading):
    """Tokenize a corpus into the token cache (and, with --teacher and --soft-labels K, score it once into
    soft-label shards), then say what a training run will find there."""

    data: str | None = None
    """Corpus: a folder, .zip, .txt, .jsonl(.gz/.zst), .parquet, hf:NAME, or a PATH:WEIGHT,... list (default:
    $SCRATCHLM_DATA)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: $SCRATCHLM_TOKENIZER, else microsoft/phi-2)."""
    num_proc: Count | None = None
    """Processes that tokenize (default: every core), and that score with a local teacher (default: 1)."""
    verify_cache: bool = True
    """Read every shard back and check it against its checksum."""
    teacher: str | None = None
    """Teacher to score the corpus with: local:PATH_OR_HUB_ID or openai:URL[#model]."""
    soft_labels: SoftLabelCount = 0
    """The teacher's top-k kept per token (needs --teacher; a training run reads them with --soft-labels)."""
    device: DeviceSpec = "auto"
    """Where a local teacher runs: auto, cpu, cuda or cuda:N."""


def run_prepare(cfg: PrepareConfig) -> dict:
    from .data.sources import corpus_from_env, parse_data_list
    from .data.token_cache import tokenize_corpus
    from .tokenizer import load_tokenizer

    if bool(cfg.teacher) != bool(cfg.soft_labels):
        raise DataError("soft labels need both --teacher SPEC and --soft-labels K")
    tokenizer = load_tokenizer(cfg.tokenizer)
    report = []
    for source in parse_data_list(corpus_from_env(cfg.data, "--data")):
        corpus = tokenize_corpus(source.path, tokenizer, cfg.part(CorpusReading),
                                 progress=sys.stderr.isatty(), num_proc=cfg.num_proc, verify=cfg.verify_cache)
        entry = {"data": source.path, "cache": str(corpus.folder), "shards": len(corpus.train.arrays),
                 "train_tokens": corpus.meta["train_tokens"], "held_out_tokens": corpus.meta["val_tokens"],
                 "documents": corpus.meta["train_documents"] + corpus.meta["val_documents"],
                 "files_skipped": corpus.stats["skipped"]}
        if cfg.teacher:
            from .teacher.label_shards import build_soft_labels

            folder = build_soft_labels(corpus, cfg.teacher, cfg.soft_labels, cfg.num_proc or 1, cfg.device,
                                       sys.stderr.isatty(), verify=cfg.verify_cache,
                                       vocab_size=tokenizer.vocab_size)
            entry["soft_labels"] = {"folder": str(folder), "teacher": cfg.teacher, "k": cfg.soft_labels}
        report.append(entry)
    print(json.dumps(report, indent=2))
    return {"corpora": report}
