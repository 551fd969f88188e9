"""A corpus tokenized once into a cache: ``train.bin`` / ``val.bin`` (uint16 token ids) and ``meta.json``.

Documents are tokenized in batches (the ``tokenizers`` thread pool), each followed by ``<|endoftext|>``, and
written to the train or held-out file by ``is_held_out``. The cache folder is keyed by the corpus files (path,
size, modification time), the tokenizer and the settings, so a changed corpus is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import atomic_dir
from ..tokenizer import Tokenizer
from .documents import CorpusStats, DataError, is_held_out, iter_documents

CACHE_FORMAT = 1
CACHE_ENV = "SCRATCHLM_CACHE"


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
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "scratchlm"))


def _source_bytes(source: Path) -> int:
    if source.is_dir():
        return sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    return source.stat().st_size


def _memmap(path: Path, n_tokens: int) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r") if n_tokens else np.zeros(0, np.uint16)


def tokenize_corpus(source: str | Path, tokenizer: Tokenizer, cache_dir: str | Path | None = None,
                    chunk_chars: int = 8000, eval_fraction: float = 0.005, batch_docs: int = 256,
                    progress: bool = True) -> TokenizedCorpus:
    """Tokenize a corpus once into ``train.bin`` / ``val.bin`` (uint16) and reuse the cache afterwards."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"corpus '{source}' does not exist")
    if tokenizer.vocab_size > 2**16:
        raise DataError("token cache stores uint16 ids; this tokenizer has more than 65536")
    key = _cache_key(source, tokenizer, chunk_chars, eval_fraction)
    cache = Path(cache_dir or default_cache_dir()) / "tokens" / key
    if not (cache / "meta.json").exists():
        _remove_abandoned(cache.parent)
        # A folder of our own (by process id): two processes building the same cache do not collide.
        with atomic_dir(cache, cache.with_name(f"{key}.tmp{os.getpid()}"), replace=False) as tmp:
            _write_tokens(source, tokenizer, tmp, chunk_chars, eval_fraction, batch_docs, progress)
    meta = json.loads((cache / "meta.json").read_text())
    return TokenizedCorpus(_memmap(cache / "train.bin", meta["train_tokens"]),
                           _memmap(cache / "val.bin", meta["val_tokens"]), meta)


def _remove_abandoned(tokens_dir: Path) -> None:
    """Delete the half-written caches (``KEY.tmpPID``) of tokenizations that were killed: their process is
    gone."""
    for tmp in tokens_dir.glob("*.tmp*") if tokens_dir.is_dir() else []:
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdecimal() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _write_tokens(source: Path, tokenizer: Tokenizer, out: Path, chunk_chars: int, eval_fraction: float,
                  batch_docs: int, progress: bool) -> None:
    stats = CorpusStats()
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    bar = tqdm(total=_source_bytes(source), unit="B", unit_scale=True, desc="tokenizing corpus",
               disable=not progress or None)
    with open(out / "train.bin", "wb") as train_f, open(out / "val.bin", "wb") as val_f:
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
    bar.close()
    if counts["train"] == 0:
        raise DataError(f"corpus '{source}' has no usable text "
                        f"(files skipped: {dict(stats.skipped) or 'none'}, documents: {stats.documents})")
    meta = {"source": str(source), "chunk_chars": chunk_chars, "eval_fraction": eval_fraction,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "train_documents": docs["train"],
            "val_documents": docs["val"], "stats": stats.to_dict(), "tokenizer_vocab": tokenizer.vocab_size}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
