"""A corpus tokenized once into a cache of token shards, in parallel, resumably.

The corpus is cut into units (``documents.corpus_units``: files, zip members, parquet row groups). Each unit
is tokenized on its own, by one of ``num_proc`` worker processes, into a shard: ``NNNNNN.train.bin`` and
``NNNNNN.val.bin`` (uint16 token ids, each document followed by ``<|endoftext|>``, held-out documents apart by
``is_held_out``) and ``NNNNNN.json`` (its counts, written last: a shard without it is unfinished). Shards are
written into ``KEY.partial/``; an interrupted run leaves the finished ones there and the next run tokenizes
only the rest. When all are done, ``index.json`` is written and the folder renamed to ``KEY``. The result does
not depend on the number of processes: shard k is unit k's tokens, in order.

Training reads the shards as one array (``ShardedTokens``), memory-mapped. The cache key covers the corpus
files (path, size, modification time), the tokenizer and the settings, so a changed corpus is tokenized again.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import faults
from ..files import atomic_file, atomic_write, build_lock, file_crc32, pid_alive
from ..tokenizer import Tokenizer
from .documents import (
    CorpusStats,
    DataError,
    Unit,
    corpus_units,
    unit_documents,
)
from .held_out import is_held_out
from .hf_spec import HF_PREFIX, parse_hf
from .reading import CorpusReading

log = logging.getLogger("scratchlm.data")

CACHE_FORMAT = 2
CACHE_ENV = "SCRATCHLM_CACHE"
IN_PROCESS_BYTES = 16 * 2**20
"""Less than this to tokenize is done in this process: starting workers would cost more than it saves."""
ABANDONED_AFTER_S = 7 * 24 * 3600
"""An unfinished cache nobody has touched for this long is deleted (its corpus has probably changed)."""
SHARD_KEYS = ("train_tokens", "val_tokens", "train_crc32", "val_crc32")
"""What the index keeps of each shard: its sizes (checked at every open) and checksums (``verify``; caches
built before checksums have none)."""
class ShardedTokens:
    """Token arrays (one per shard) seen as one: its length, slices across shard boundaries,
    ``np.asarray``."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = [a for a in arrays if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("ShardedTokens takes contiguous slices only")
        parts = []
        k = max(0, bisect.bisect_right(self.starts, start) - 1)
        while start < stop:
            a = self.arrays[k]
            take = min(stop, self.starts[k + 1]) - start
            parts.append(a[start - self.starts[k] : start - self.starts[k] + take])
            start, k = start + take, k + 1
        if not parts:
            return np.zeros(0, np.uint16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.arrays) if self.arrays else np.zeros(0, np.uint16)
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class TokenizedCorpus:
    """Train and held-out tokens (memory-mapped shards) and what building them found."""

    train: ShardedTokens
    val: ShardedTokens
    meta: dict
    folder: Path | None = None
    """The cache folder (soft-label shards live beside the token shards, under ``soft/``)."""

    @property
    def stats(self) -> dict:
        return self.meta["stats"]


def source_key(source: str | Path, settings: list) -> str:
    """A cache key for what a corpus gives with these settings: its files' paths, sizes and modification
    times, and the settings (JSON-serialisable)."""
    h = hashlib.blake2b(digest_size=12)
    if str(source).startswith(HF_PREFIX):  # a local dataset folder: its files; a hub id: its name
        name = parse_hf(str(source))[0]
        root = Path(name).expanduser().resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        h.update(json.dumps([str(source), str(root), *settings]).encode())
    else:
        root = Path(source).expanduser().resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        h.update(json.dumps([str(root), *settings]).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "scratchlm"))


def _memmap(path: Path, n_tokens: int) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r") if n_tokens else np.zeros(0, np.uint16)


def tokenize_corpus(source: str | Path, tokenizer: Tokenizer, reading: CorpusReading | None = None,
                    cache_dir: str | Path | None = None, batch_docs: int = 256, progress: bool = True,
                    num_proc: int | None = None, verify: bool = False) -> TokenizedCorpus:
    """Tokenize a corpus (its documents as ``reading`` cuts and splits them) once into token shards
    (``num_proc`` processes; default: every core) and reuse the cache afterwards. Every open checks each
    shard's size against the index; ``verify`` also checks each shard's checksum. A damaged shard is tokenized
    again, with a warning naming it."""
    reading = reading or CorpusReading()
    if not str(source).startswith(HF_PREFIX):
        source = Path(source).expanduser()
        if not source.exists():
            raise DataError(f"corpus '{source}' does not exist")
    if tokenizer.vocab_size > 2**16:
        raise DataError("token cache stores uint16 ids; this tokenizer has more than 65536")
    key = source_key(source, [CACHE_FORMAT, reading.chunk_chars, reading.eval_fraction, reading.text_field,
                              tokenizer.digest])
    cache = Path(cache_dir or default_cache_dir()) / "tokens" / key
    if not (cache / "index.json").exists() or damaged_shards(cache, verify):
        job = _Job(tokenizer.backend.to_str(), tokenizer.eot_id, reading, batch_docs)
        with build_lock(cache.with_name(key + ".lock"), f"the token cache of {source}"):
            built = (cache / "index.json").exists()  # looked at again: another process may have done it
            damaged = damaged_shards(cache, verify) if built else []
            if not built or damaged:
                _rebuild(source, job, cache, damaged, num_proc or os.cpu_count() or 1, progress)
    index = json.loads((cache / "index.json").read_text())
    shards = index.pop("shards")
    train = ShardedTokens([_memmap(cache / f"{k}.train.bin", s["train_tokens"]) for k, s in shards])
    val = ShardedTokens([_memmap(cache / f"{k}.val.bin", s["val_tokens"]) for k, s in shards])
    return TokenizedCorpus(train, val, index, cache)


def damaged_shards(cache: Path, checksums: bool = False) -> list[tuple[str, str]]:
    """(shard, what is wrong) for each shard of a finished cache whose files are missing or of another size
    than the index says (cheap: every open), or, with ``checksums``, whose bytes differ from what was written
    (a full read)."""
    try:
        shards = json.loads((cache / "index.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return [("index.json", "missing or unreadable")]
    damaged = []
    for name, counts in shards:
        for split in ("train", "val"):
            path = cache / f"{name}.{split}.bin"
            size = path.stat().st_size if path.exists() else None
            if size != 2 * counts[f"{split}_tokens"]:
                damaged.append((name, f"{path.name} holds {size} bytes, the index says "
                                      f"{2 * counts[f'{split}_tokens']}"))
            elif checksums and f"{split}_crc32" in counts and file_crc32(path) != counts[f"{split}_crc32"]:
                damaged.append((name, f"{path.name} differs from its checksum"))
    return damaged



def _rebuild(source: str | Path, job: _Job, cache: Path, damaged: list[tuple[str, str]], num_proc: int,
             progress: bool) -> None:
    """Build the cache, or (``damaged``) tokenize its damaged shards again: the cache goes back to its
    ``.partial`` folder without them, and the resumable build does the rest. Called under the build lock."""
    partial = cache.with_name(cache.name + ".partial")
    if damaged:
        for name, why in damaged:
            log.warning("token cache %s: shard %s is damaged (%s): tokenizing it again", cache, name, why)
        if partial.exists():
            shutil.rmtree(partial)
        os.replace(cache, partial)
        (partial / "index.json").unlink(missing_ok=True)
        for name in {n for n, _ in damaged if n != "index.json"}:
            for suffix in (".json", ".train.bin", ".val.bin"):
                (partial / f"{name}{suffix}").unlink(missing_ok=True)
    else:
        remove_abandoned(cache.parent)
    _build(source, job, cache, num_proc, progress)


@dataclass(frozen=True)
class _Job:
    """What a worker needs to tokenize a unit (picklable)."""

    tokenizer_json: str
    eot_id: int
    reading: CorpusReading
    batch_docs: int
    threads: bool = False
    """Whether a batch is spread over the tokenizers library's threads (in this process, ``num_proc`` > 1, a
    small corpus); otherwise one core, as ``--num-proc`` counts."""


_worker_tokenizers: dict[str, object] = {}


def _tokenizer(job: _Job):
    """The tokenizer of a job, made once per process."""
    if job.tokenizer_json not in _worker_tokenizers:
        from tokenizers import Tokenizer as HFTokenizer

        _worker_tokenizers[job.tokenizer_json] = HFTokenizer.from_str(job.tokenizer_json)
    return _worker_tokenizers[job.tokenizer_json]


def _single_threaded() -> None:
    # Parallelism comes from the processes: each one's tokenizer works on one thread, so 2 processes on 2
    # cores do not fight over them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenize_unit(job: _Job, unit: Unit, out: Path, k: int) -> dict:
    """Tokenize one unit into shard ``k`` in ``out``; returns (and writes last) the shard's counts."""
    tokenizer, stats = _tokenizer(job), CorpusStats()
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0}
    name = f"{k:06d}"
    crcs = {"train_crc32": 0, "val_crc32": 0}
    with atomic_file(out / f"{name}.train.bin") as train_tmp, \
            atomic_file(out / f"{name}.val.bin") as val_tmp, \
            open(train_tmp, "wb") as train_f, open(val_tmp, "wb") as val_f:
        files = {"train": train_f, "val": val_f}

        def flush(batch: list[tuple[str, str]]) -> None:
            texts = [t for _, t in batch]
            encoded = (tokenizer.encode_batch(texts, add_special_tokens=False) if job.threads
                       else [tokenizer.encode(t, add_special_tokens=False) for t in texts])
            for (doc_id, _), e in zip(batch, encoded, strict=True):
                split = "val" if is_held_out(doc_id, job.reading.eval_fraction) else "train"
                data = np.asarray(e.ids + [job.eot_id], dtype=np.uint16).tobytes()
                files[split].write(data)
                crcs[f"{split}_crc32"] = zlib.crc32(data, crcs[f"{split}_crc32"])
                counts[f"{split}_tokens"] += len(data) // 2
                counts[f"{split}_documents"] += 1

        batch: list[tuple[str, str]] = []
        for doc in unit_documents(unit, job.reading, stats):
            stats.documents += 1
            stats.bytes += len(doc[1].encode("utf-8"))
            batch.append(doc)
            if len(batch) >= job.batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    meta = {**counts, **crcs, "unit": unit.label, "bytes": unit.bytes, "stats": stats.to_dict()}
    faults.pause("token-shard")
    atomic_write(out / f"{name}.json", json.dumps(meta))  # last: the shard is complete
    return meta


def _build(source: str | Path, job: _Job, cache: Path, num_proc: int, progress: bool) -> None:
    partial = cache.with_name(cache.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()
    units = corpus_units(source, stats)
    done = {k: json.loads((partial / f"{k:06d}.json").read_text()) for k in range(len(units))
            if (partial / f"{k:06d}.json").exists()}
    todo = [k for k in range(len(units)) if k not in done]
    bar = tqdm(total=sum(u.bytes for u in units), initial=sum(units[k].bytes for k in done), unit="B",
               unit_scale=True, desc=f"tokenizing ({min(num_proc, max(1, len(todo)))} processes)",
               disable=not progress or None)
    if num_proc <= 1 or len(todo) <= 1 or sum(units[k].bytes for k in todo) < IN_PROCESS_BYTES:
        job = dataclasses.replace(job, threads=num_proc > 1)
        for k in todo:
            done[k] = _tokenize_unit(job, units[k], partial, k)
            bar.update(units[k].bytes)
    else:
        with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_single_threaded) as pool:
            futures = {pool.submit(_tokenize_unit, job, units[k], partial, k): k for k in todo}
            for future in futures:  # in order, so the bar moves as the shards finish in turn
                done[futures[future]] = future.result()
                bar.update(units[futures[future]].bytes)
    bar.close()
    shards = [done[k] for k in range(len(units))]
    for shard in shards:
        stats.merge(shard["stats"])
    totals = {key: sum(s[key] for s in shards) for key in ("train_tokens", "val_tokens", "train_documents",
                                                             "val_documents")}
    if totals["train_tokens"] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"corpus '{source}' has no usable text "
                        f"(files skipped: {dict(stats.skipped) or 'none'}, documents: {stats.documents})")
    index = {"source": str(source), **job.reading.model_dump(), **totals, "stats": stats.to_dict(),
             "shards": [[f"{k:06d}", {key: s[key] for key in SHARD_KEYS if key in s}]
                        for k, s in enumerate(shards)]}
    atomic_write(partial / "index.json", json.dumps(index, indent=1))
    os.replace(partial, cache)  # under the build lock: no one else writes this cache


def remove_abandoned(tokens_dir: Path) -> None:
    """Delete what killed tokenizations left: the temporary folders of earlier versions (``KEY.tmpPID``, their
    process gone) and unfinished caches untouched for a week (a recent one is resumed by the next run)."""
    for tmp in tokens_dir.glob("*.tmp*") if tokens_dir.is_dir() else []:
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdecimal() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    for partial in tokens_dir.glob("*.partial") if tokens_dir.is_dir() else []:
        if time.time() - partial.stat().st_mtime > ABANDONED_AFTER_S:
            shutil.rmtree(partial, ignore_errors=True)

