"""``build_data``: the one place that tells a corpus, a mix and a feed apart, and makes batches and a
held-out set of what it finds."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..tokenizer import Tokenizer
from .blocks import block_span
from .documents import DataError
from .loaders import (
    Batch,
    BlockLoader,
    BlockSoftLabels,
    DataPosition,
    MixedBlockLoader,
    eval_blocks,
    prefetch,
)
from .reading import CorpusReading, FeedReading, SoftLabelReading
from .sources import DataSource, is_feed_url, parse_data_list
from .token_cache import TokenizedCorpus, tokenize_corpus

log = logging.getLogger("scratchlm.data")


@dataclass(frozen=True)
class DataRequest:
    """What a training run asks of its data: sizes, and the settings it reads with, as the objects they are
    declared in (``reading``, ``feed``, ``soft``: their defaults are theirs)."""

    source: str
    """A corpus path, a ``PATH:WEIGHT,...`` list of corpora, or a feed URL."""
    block_size: int
    """Tokens per training sequence (each block holds one more, the last target)."""
    batch_size: int
    """Sequences per batch on each rank."""
    eval_blocks: int
    """Blocks in the fixed held-out evaluation set."""
    seed: int
    """Seed of the block order."""
    verify_cache: bool
    """Check every shard against its checksum (sizes are checked at every open)."""
    reading: CorpusReading = field(default_factory=CorpusReading)
    """How a corpus is cut into documents and split (the same settings a feed or ``prepare`` used)."""
    feed: FeedReading = field(default_factory=FeedReading)
    """How a feed is read (its key, request size, shuffle buffer)."""
    soft: SoftLabelReading = field(default_factory=SoftLabelReading)
    """Which soft labels are read beside each token."""
    num_proc: int | None = None
    """Processes that tokenize a corpus (default: every core)."""
    run_batches: int | None = None
    """Batches this rank draws over the whole run, when known: a feed's buffer never holds more than the
    rest of the run trains on."""
    progress: bool = False
    """Show a progress bar while tokenizing."""


@dataclass
class TrainData:
    """What training reads: endless batches and the fixed held-out blocks."""

    kind: str
    """'corpus', 'mix' or 'feed'; saved positions carry it, so a resume with other data is caught."""
    batches: Iterator[Batch]
    eval_set: torch.Tensor
    """(n, T+1) held-out blocks, the same at every evaluation."""
    eval_groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    """For a mix: each source's rows of ``eval_set`` (its losses are logged apart)."""

    def close(self) -> None:
        """Stop the background loader now, not at interpreter exit."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


FEED_KIND = "feed"
_KIND_NAMES = {"corpus": "one corpus", "mix": "a mix of corpora", "feed": "a feed"}


def data_kind(source: str) -> str:
    """'feed', 'mix' or 'corpus': what a data setting names."""
    if is_feed_url(source):
        return FEED_KIND
    return MixedBlockLoader.KIND if len(parse_data_list(source)) > 1 else DataPosition.KIND


def build_data(request: DataRequest, tokenizer: Tokenizer, env: distributed.DistEnv = distributed.DistEnv(),
               position: dict | None = None) -> TrainData:
    """Batches for this rank from ``position`` (a saved one, or the start) and the held-out blocks."""
    position = position or {}
    kind = data_kind(request.source)
    saved = position.get("kind", kind)
    if saved != kind:
        raise DataError(f"this run was saved training on {_KIND_NAMES.get(saved, saved)} and the data "
                        f"setting now names {_KIND_NAMES[kind]}: resume with the same --data list")
    if kind == FEED_KIND:
        return _feed_data(request, tokenizer, env, position)
    return _corpus_data(request, tokenizer, env, position, kind)


def _feed_data(request: DataRequest, tokenizer: Tokenizer, env: distributed.DistEnv,
               position: dict) -> TrainData:
    from .remote import FeedBlockLoader, client_from_env

    client = client_from_env(request.source, request.feed.feed_api_key_file)
    served = client.health().get("tokenizer")
    if served != tokenizer.digest:  # the feed sends token ids: they must be this run's tokenizer's
        raise DataError(f"the feed at {request.source} tokenizes with another tokenizer ({served}) than this "
                        f"run ({tokenizer.source}, {tokenizer.digest}): start both with the same "
                        "--tokenizer (or $SCRATCHLM_TOKENIZER)")
    # Held-out documents come from the server: never part of its training stream.
    val_tokens = tokenizer.encode_documents(client.heldout(size=1024))
    eval_set = eval_blocks(val_tokens, request.block_size, request.eval_blocks)
    loader = FeedBlockLoader(client, request.block_size, request.batch_size, request.seed, request.feed,
                             request.soft.soft_labels, position, rank=env.rank, world_size=env.world_size,
                             run_batches=request.run_batches, vocab_size=tokenizer.vocab_size)
    held = loader.held_blocks()
    log.info("data: feed %s; %s held-out tokens from the server; batches drawn from a buffer of %s blocks "
             "(%s tokens%s)", request.source, f"{len(val_tokens):,}", f"{held:,}",
             f"{held * block_span(request.block_size):,}",
             ": all the run reads" if held < loader.buffer_blocks else "")
    return TrainData(FEED_KIND, iter(loader), eval_set)


def _tokenize_all(request: DataRequest, tokenizer: Tokenizer, env: distributed.DistEnv,
                  sources: list[DataSource]) -> list[TokenizedCorpus]:
    if not env.is_main:
        distributed.wait_for_all(env)  # rank 0 tokenizes into the cache first (as long as it takes)
    corpora = [tokenize_corpus(s.path, tokenizer, request.reading, progress=request.progress and env.is_main,
                               num_proc=request.num_proc, verify=request.verify_cache)
               for s in sources]
    if env.is_main:
        distributed.wait_for_all(env)
    return corpora


def _soft_labels(request: DataRequest, corpora: list[TokenizedCorpus],
                 sources: list[DataSource]) -> list[BlockSoftLabels | None]:
    """Each source's prepared soft labels, when the run reads them: in a mix, a source without any trains
    on plain cross-entropy (said in the log); one corpus must have them."""
    if not request.soft.soft_labels:
        return [None] * len(corpora)
    from .soft_labels import open_soft_labels

    found: list[BlockSoftLabels | None] = []
    for source, corpus in zip(sources, corpora, strict=True):
        try:
            shards = open_soft_labels(corpus, request.soft.soft_labels, request.soft.soft_label_teacher,
                                      request.verify_cache)
        except DataError as err:
            if len(corpora) == 1:
                raise
            log.warning("data: %s has no soft labels (%s): its blocks train on plain cross-entropy",
                        source.path, err)
            found.append(None)
            continue
        log.info("data: %s: soft labels of %s (top %d of %d kept)", source.path, shards.meta["teacher"],
                 request.soft.soft_labels, shards.k)
        found.append(BlockSoftLabels(shards, request.block_size, request.soft.soft_labels))
    return found


def _corpus_data(request: DataRequest, tokenizer: Tokenizer, env: distributed.DistEnv, position: dict,
                 kind: str) -> TrainData:
    sources = parse_data_list(request.source)
    corpora = _tokenize_all(request, tokenizer, env, sources)
    total_weight = sum(s.weight for s in sources)
    eval_parts = []
    for source, corpus in zip(sources, corpora, strict=True):
        share = f" at {source.weight / total_weight:.1%} of training blocks" if len(sources) > 1 else ""
        log.info("data: %s%s: %s train tokens, %s held-out tokens (%d documents); files skipped: %s",
                 source.path, share, f"{corpus.meta['train_tokens']:,}", f"{corpus.meta['val_tokens']:,}",
                 corpus.meta["val_documents"], corpus.stats["skipped"] or "none")
        # Each source's held-out blocks in proportion to its weight (at least one), kept apart for per-source
        # losses: with a mix, the overall figure hides which source is learnt.
        n = request.eval_blocks if len(sources) == 1 else max(1, round(request.eval_blocks * source.weight
                                                                        / total_weight))
        try:
            eval_parts.append(eval_blocks(corpus.val, request.block_size, n))
        except DataError as err:  # name the corpus: in a mix, which one is too small is the whole question
            raise DataError(f"{source.path}: {err}") from None
    soft = _soft_labels(request, corpora, sources)
    if kind == DataPosition.KIND:
        loader = BlockLoader(corpora[0].train, request.block_size, request.batch_size, request.seed,
                             DataPosition.from_dict(position), env.rank, env.world_size, soft[0])
        return TrainData(kind, prefetch(iter(loader)), eval_parts[0])
    loader = MixedBlockLoader([c.train for c in corpora], [s.weight for s in sources], request.block_size,
                              request.batch_size, request.seed, position, env.rank, env.world_size,
                              [s.path for s in sources], soft)
    bounds = torch.tensor([0] + [len(p) for p in eval_parts]).cumsum(0).tolist()
    groups = {s.name: (bounds[k], bounds[k + 1]) for k, s in enumerate(sources)}
    return TrainData(kind, prefetch(iter(loader)), torch.cat(eval_parts), groups)
