"""Corpus reading, tokenization into a cached token file, and the resumable block loader.

A corpus is a zip of text files (the seed's ``sample.zip``), a folder, a ``.txt``, ``.jsonl``/``.jsonl.gz``
(``text`` field) or ``.parquet`` (``text`` column). Text files are cut into documents of at most
``chunk_chars`` characters at paragraph breaks. A fixed share of documents, chosen by a hash of their id (so the
same for every run and seed), is held out for evaluation and never trained on.

Documents are tokenized in batches (the ``tokenizers`` thread pool), joined with ``<|endoftext|>`` and written once
to ``train.bin`` / ``val.bin`` (uint16) in a cache keyed by the corpus files, the tokenizer and these settings.
Training reads blocks of T+1 tokens from it: no padding. The data position is ``(epoch, index)`` into a seeded
per-epoch permutation of blocks, so a resumed run continues exactly where it stopped. Several corpora mix in fixed
proportions (``MixedBlockLoader``), each with its own cache and position.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import queue
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
MAX_MEMBER_BYTES = 256 * 2**20
"""Largest file or zip member read (decompressed): guards against zip bombs and stray binaries."""


class DataError(RuntimeError):
    """The corpus cannot be used (missing, empty, unreadable); the message says which and why."""


@dataclass
class CorpusStats:
    """What reading a corpus found: files used, files skipped by reason, documents and bytes."""

    files_read: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, name: str, reason: str) -> None:
        if not self.skipped[reason]:
            log.warning("skipping %s: %s (further files skipped for this reason are only counted)", name, reason)
        self.skipped[reason] += 1

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped": dict(self.skipped)}


def _decode(name: str, raw: bytes, stats: CorpusStats) -> str | None:
    if not raw.strip():
        stats.skip(name, "empty")
        return None
    if b"\x00" in raw[:8192]:
        stats.skip(name, "binary")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip(name, "not UTF-8")
        return None


def _read_capped(f, name: str, stats: CorpusStats) -> bytes | None:
    raw = f.read(MAX_MEMBER_BYTES + 1)
    if len(raw) > MAX_MEMBER_BYTES:
        stats.skip(name, f"larger than {MAX_MEMBER_BYTES // 2**20} MiB")
        return None
    return raw


def _corpus_files(root: Path, stats: CorpusStats) -> list[Path]:
    """Files of a folder corpus, sorted; links pointing outside the folder are refused."""
    real_root = root.resolve()
    files = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if not path.resolve().is_relative_to(real_root):
            stats.skip(str(path), "link pointing outside the corpus folder")
            continue
        if path.name.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES + (".zip",)):
            files.append(path)
    return files


def _records(name: str, raw: bytes, stats: CorpusStats) -> Iterator[str]:
    """The ``text`` values of a JSON-lines or parquet file."""
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install 'scratchlm[parquet]'") from None
        table = pq.read_table(io.BytesIO(raw), columns=["text"])
        yield from (t for t in table.column("text").to_pylist() if t)
        return
    if name.endswith(".gz"):
        try:
            raw = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(MAX_MEMBER_BYTES + 1)
        except (OSError, EOFError):
            stats.skip(name, "corrupt gzip")
            return
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            stats.skip(f"{name}:{line_no}", "bad JSON line")
            continue
        if isinstance(text, str) and text.strip():
            yield text


def split_paragraphs(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut text into pieces of at most ``chunk_chars`` at blank lines (at newlines, then anywhere, if needed)."""
    if len(text) <= chunk_chars:
        yield text
        return
    piece: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        while len(para) > chunk_chars:  # one huge paragraph (or a single huge line): cut it
            cut = para.rfind("\n", 0, chunk_chars)
            cut = cut if cut > 0 else chunk_chars
            if piece:
                yield "\n\n".join(piece)
                piece, size = [], 0
            yield para[:cut]
            para = para[cut:].lstrip("\n")
        if size + len(para) + 2 > chunk_chars and piece:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(para)
        size += len(para) + 2
    if piece and any(p.strip() for p in piece):
        yield "\n\n".join(piece)


def _member_documents(name: str, raw: bytes, chunk_chars: int, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    if name.endswith(RECORD_SUFFIXES):
        texts = _records(name, raw, stats)
    else:
        text = _decode(name, raw, stats)
        texts = iter([text] if text is not None else [])
    n = 0
    for i, text in enumerate(texts):
        for j, piece in enumerate(split_paragraphs(text, chunk_chars)):
            if piece.strip():
                n += 1
                yield f"{name}#{i}.{j}", piece
    if n:
        stats.files_read += 1


def _zip_documents(path: Path, label: str, chunk_chars: int, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        stats.skip(label, f"not a readable zip ({err})")
        return
    with archive:
        members = sorted(i.filename for i in archive.infolist() if not i.is_dir())
        for member in members:
            member_label = f"{label}/{member}"
            if not member.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
                stats.skip(member_label, "not a text, jsonl or parquet member")
                continue
            try:
                with archive.open(member) as f:
                    raw = _read_capped(f, member_label, stats)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, NotImplementedError):
                stats.skip(member_label, "corrupt zip member")
                continue
            if raw is not None:
                yield from _member_documents(member_label, raw, chunk_chars, stats)


def iter_documents(source: str | Path, chunk_chars: int = 8000,
                   stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """(document id, text) for every document of a corpus, in a fixed order. Bad files are skipped and counted."""
    stats = stats if stats is not None else CorpusStats()
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"corpus '{source}' does not exist")
    files = _corpus_files(root, stats) if root.is_dir() else [root]
    for path in files:
        label = str(path.relative_to(root)) if root.is_dir() else path.name
        if path.suffix == ".zip":
            yield from _zip_documents(path, label, chunk_chars, stats)
            continue
        if not path.name.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
            raise DataError(f"'{source}': unsupported corpus format (use a folder, .zip, .txt, .jsonl, .parquet)")
        try:
            with open(path, "rb") as f:
                raw = _read_capped(f, label, stats)
        except OSError as err:
            stats.skip(label, f"unreadable ({err.strerror})")
            continue
        if raw is not None:
            yield from _member_documents(label, raw, chunk_chars, stats)


@dataclass(frozen=True)
class DataSource:
    """One corpus of a training mix and its share of the training blocks."""

    path: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return Path(self.path).name or self.path


def parse_data_list(spec: str) -> list[DataSource]:
    """``PATH`` (one corpus) or ``PATH:WEIGHT,PATH:WEIGHT,...`` (a mix; a missing weight is 1; weights are
    relative). A string naming an existing file or folder is always that one corpus, commas or colons and all."""
    if Path(spec).expanduser().exists() or "," not in spec and ":" not in spec:
        return [DataSource(spec)]
    sources = []
    for item in spec.split(","):
        path, _, weight_text = item.strip().rpartition(":")
        if not path:  # no colon: a path alone
            path, weight_text = weight_text, "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise DataError(f"data list item '{item}': the weight after ':' must be a number") from None
        if not weight > 0:
            raise DataError(f"data list item '{item}': the weight must be positive")
        if not Path(path).expanduser().exists():
            raise DataError(f"data list item '{item}': corpus '{path}' does not exist")
        sources.append(DataSource(path, weight))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):  # they label the per-source evaluation losses
        raise DataError(f"data list: two sources are named alike ({', '.join(names)}); rename one")
    return sources


def is_held_out(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the evaluation set: a hash of its id, so fixed across runs and seeds."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


# ---------------------------------------------------------------------------------------------------------------
# Tokenized cache


@dataclass
class TokenizedCorpus:
    """Train and held-out token arrays (uint16 memmaps) and what building them found."""

    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def stats(self) -> dict:
        return self.meta["stats"]


def _cache_key(source: Path, tokenizer: Tokenizer, chunk_chars: int, eval_fraction: float) -> str:
    root = source.expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([CACHE_FORMAT, str(root), chunk_chars, eval_fraction]).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(hashlib.blake2b(tokenizer.backend.to_str().encode(), digest_size=12).digest())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCRATCHLM_CACHE", Path.home() / ".cache" / "scratchlm"))


def _source_bytes(source: Path) -> int:
    if source.is_dir():
        return sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    return source.stat().st_size


def tokenize_corpus(source: str | Path, tokenizer: Tokenizer, cache_dir: str | Path | None = None,
                    chunk_chars: int = 8000, eval_fraction: float = 0.005, batch_docs: int = 256,
                    progress: bool = True) -> TokenizedCorpus:
    """Tokenize a corpus once into ``train.bin`` / ``val.bin`` (uint16) and reuse the cache afterwards."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"corpus '{source}' does not exist")
    if tokenizer.vocab_size > 2**16:
        raise DataError("token cache stores uint16 ids; this tokenizer has more than 65536")
    cache = Path(cache_dir or default_cache_dir()) / "tokens" / _cache_key(source, tokenizer, chunk_chars, eval_fraction)
    if not (cache / "meta.json").exists():
        _build_token_cache(source, tokenizer, cache, chunk_chars, eval_fraction, batch_docs, progress)
    meta = json.loads((cache / "meta.json").read_text())
    train = np.memmap(cache / "train.bin", dtype=np.uint16, mode="r") if meta["train_tokens"] else np.zeros(0, np.uint16)
    val = np.memmap(cache / "val.bin", dtype=np.uint16, mode="r") if meta["val_tokens"] else np.zeros(0, np.uint16)
    return TokenizedCorpus(train, val, meta)


def _build_token_cache(source: Path, tokenizer: Tokenizer, cache: Path, chunk_chars: int, eval_fraction: float,
                       batch_docs: int, progress: bool) -> None:
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    bar = tqdm(total=_source_bytes(source), unit="B", unit_scale=True, desc="tokenizing corpus",
               disable=not progress or None)
    with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f:
        outputs = {"train": train_f, "val": val_f}

        def flush(batch: list[tuple[str, str]]) -> None:
            for (doc_id, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch]), strict=True):
                split = "val" if is_held_out(doc_id, eval_fraction) else "train"
                arr = np.asarray(ids + [tokenizer.eot_id], dtype=np.uint16)
                outputs[split].write(arr.tobytes())
                counts[split] += len(arr)
                docs[split] += 1
            bar.update(sum(len(t.encode("utf-8")) for _, t in batch))

        batch: list[tuple[str, str]] = []
        for doc in iter_documents(source, chunk_chars, stats):
            stats.documents += 1
            stats.bytes += len(doc[1].encode("utf-8"))
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        for f in outputs.values():
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    if counts["train"] == 0:
        raise DataError(f"corpus '{source}' has no usable text "
                        f"(files skipped: {dict(stats.skipped) or 'none'}, documents: {stats.documents})")
    meta = {"source": str(source), "chunk_chars": chunk_chars, "eval_fraction": eval_fraction,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "train_documents": docs["train"],
            "val_documents": docs["val"], "stats": stats.to_dict(), "tokenizer_vocab": tokenizer.vocab_size}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, cache)
    except OSError:  # another process built the same cache meanwhile: keep theirs
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# Block loader


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: the next block is ``order(epoch)[index]``."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    position: dict  # the stream position after this batch (loader-specific, JSON-serialisable)


class EpochOrder:
    """The seeded permutation of n blocks for each epoch (the latest one kept)."""

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks, self.seed = n_blocks, seed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._epoch = epoch
        return self._order


def block_at(tokens: np.ndarray, i: int, block_size: int) -> np.ndarray:
    """The i-th block of T+1 tokens."""
    span = block_size + 1
    return tokens[i * span : (i + 1) * span]


def _batch(blocks: list[np.ndarray], position: dict) -> Batch:
    data = torch.from_numpy(np.stack(blocks).astype(np.int64))
    return Batch(data[:, :-1], data[:, 1:], position)


class BlockLoader:
    """Seeded, resumable batches of (inputs, targets) from a token array cut into blocks of T+1 tokens.

    Each epoch visits every block once in a permutation seeded by (seed, epoch). Rank r of a world of size w takes
    the r-th slice of each group of w·B blocks, so ranks see disjoint data and advance in step.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 position: DataPosition = DataPosition(), rank: int = 0, world_size: int = 1) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_blocks = len(tokens) // (block_size + 1)
        self.per_step = batch_size * world_size
        if self.n_blocks < self.per_step:
            raise DataError(
                f"the training data has {len(tokens):,} tokens: {self.n_blocks} blocks of {block_size + 1}, fewer "
                f"than one batch of {self.per_step}; use more data, a smaller block size or batch"
            )
        self.position = position
        self.order = EpochOrder(self.n_blocks, seed)

    def next_batch(self) -> Batch:
        epoch, index = self.position.epoch, self.position.index
        if index + self.per_step > self.n_blocks:  # too few blocks left for a whole step: next epoch
            epoch, index = epoch + 1, 0
        start = index + self.rank * self.batch_size
        ids = self.order(epoch)[start : start + self.batch_size]
        self.position = DataPosition(epoch, index + self.per_step)
        return _batch([block_at(self.tokens, i, self.block_size) for i in ids], self.position.to_dict())

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


class MixedBlockLoader:
    """Batches drawn from several token arrays in fixed proportions, seeded and resumable, like ``BlockLoader``.

    Block k of the global stream comes from the source furthest behind its share (the largest
    ``weight·(k+1) − taken``): exact proportions at every point, no randomness to replay. Each source walks its own
    seeded permutations of its blocks, starting a new epoch when it runs out, so a small source with a large
    weight is repeated (upsampled) and a large one with a small weight is sampled from. Every rank computes the
    whole global stream and keeps its slice of each step (ranks see disjoint blocks). The position holds each
    source's epoch, index and count taken.
    """

    def __init__(self, sources: list[np.ndarray], weights: list[float], block_size: int, batch_size: int,
                 seed: int, position: dict | None = None, rank: int = 0, world_size: int = 1,
                 names: list[str] | None = None) -> None:
        self.tokens, self.block_size, self.batch_size = sources, block_size, batch_size
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.rank, self.per_step = rank, batch_size * world_size
        self.orders = [EpochOrder(len(t) // (block_size + 1), seed + 1_000_003 * (i + 1))
                       for i, t in enumerate(sources)]
        empty = [i for i, order in enumerate(self.orders) if order.n_blocks == 0]
        if empty:
            name = names[empty[0]] if names else f"data source {empty[0] + 1}"
            raise DataError(f"{name} has {len(sources[empty[0]]):,} training tokens, fewer than one block of "
                            f"{block_size + 1}: drop it from the list or lower the block size")
        state = (position or {}).get("sources") or [{"epoch": 0, "index": 0, "taken": 0} for _ in sources]
        if len(state) != len(sources):
            raise DataError(f"the data position has {len(state)} sources, the data list {len(sources)}: resume "
                            "with the same --data list")
        self.state = [dict(s) for s in state]

    def _next_block(self) -> np.ndarray:
        taken = sum(s["taken"] for s in self.state)
        i = max(range(len(self.state)), key=lambda j: self.weights[j] * (taken + 1) - self.state[j]["taken"])
        s, source = self.state[i], self.orders[i]
        if s["index"] >= source.n_blocks:
            s["epoch"], s["index"] = s["epoch"] + 1, 0
        block = block_at(self.tokens[i], int(source(s["epoch"])[s["index"]]), self.block_size)
        s["index"] += 1
        s["taken"] += 1
        return block

    def next_batch(self) -> Batch:
        step = [self._next_block() for _ in range(self.per_step)]
        mine = step[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _batch(mine, {"sources": [dict(s) for s in self.state]})

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


def prefetch(batches: Iterator[Batch], depth: int = 4) -> Iterator[Batch]:
    """Produce batches in a background thread, ``depth`` ahead; each batch carries its own position."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # hand any failure to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True, name="scratchlm-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Closing the generator stops and joins the producer: a thread still in torch code while the
        # interpreter exits can abort the process.
        stop.set()
        thread.join(timeout=10)


def eval_blocks(tokens: np.ndarray, block_size: int, max_blocks: int) -> torch.Tensor:
    """The fixed evaluation blocks: the first ``max_blocks`` non-overlapping blocks of T+1 held-out tokens."""
    span = block_size + 1
    n = min(len(tokens) // span, max_blocks)
    if n == 0:
        raise DataError(f"the held-out set has {len(tokens):,} tokens, fewer than one block of {span}; raise "
                        "eval_fraction or lower block_size")
    return torch.from_numpy(np.asarray(tokens[: n * span], dtype=np.int64).reshape(n, span))
