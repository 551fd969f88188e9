"""A corpus's documents written once to disk, for the feed: read one at a time, so that a server's memory does
not grow with its corpus.

``texts/KEY/`` (in the cache folder, keyed like the token cache but without the tokenizer) holds the training
documents and the held-out ones apart, each as ``NAME.bin`` (UTF-8 texts end to end) and ``NAME.offsets.npy``
(where each starts), the training documents' ids the same way, and ``meta.json`` (counts, skipped files, a
digest of the ids). Documents are read with ``os.pread``: thread-safe, and nothing stays in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_dir, build_lock
from .documents import CorpusStats, DataError, iter_documents
from .held_out import is_held_out
from .reading import CorpusReading
from .token_cache import default_cache_dir, remove_abandoned, source_key

log = logging.getLogger("scratchlm.data")

STORE_FORMAT = 1


class DocumentStore(Sequence):
    """Texts on disk, by index (``store[i]``, ``store[a:b]``, ``len(store)``)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.offsets = np.load(folder / f"{name}.offsets.npy")
        self.fd = os.open(folder / f"{name}.bin", os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return os.pread(self.fd, end - start, start).decode("utf-8")

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


class _Writer:
    """Texts appended to ``NAME.bin``, their offsets kept for ``NAME.offsets.npy``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.file = open(folder / f"{name}.bin", "wb")
        self.offsets = array("q", [0])  # 8 bytes a document, not a Python int's 28 plus a list slot

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self.file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def close(self) -> None:
        self.file.close()
        np.save(self.folder / f"{self.name}.offsets.npy", np.frombuffer(self.offsets, dtype=np.int64))


class TextStore:
    """The stored documents of a corpus: ``train`` and ``held_out`` texts, the training ``ids``, ``meta``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.train, self.ids = DocumentStore(folder, "train"), DocumentStore(folder, "ids")
        self.held_out = DocumentStore(folder, "heldout")

    @property
    def stats(self) -> CorpusStats:
        stats = CorpusStats()
        stats.merge(self.meta["stats"])
        return stats


def open_text_store(source: str | Path, reading: CorpusReading | None = None,
                    cache_dir: str | Path | None = None) -> TextStore:
    """The corpus's documents (read as ``reading`` says) on disk, written on first use (streamed: memory is a
    document at a time), by one process at a time (``files.build_lock``); a store whose files are not the size
    its offsets say is written again, with a warning."""
    reading = reading or CorpusReading()
    key = source_key(source, [STORE_FORMAT, reading.chunk_chars, reading.eval_fraction, reading.text_field])
    folder = Path(cache_dir or default_cache_dir()) / "texts" / key
    if damage(folder) is not None:
        with build_lock(folder.with_name(key + ".lock"), f"the text store of {source}"):
            why = damage(folder)  # looked at again: another process may have written it meanwhile
            if why is not None:
                if (folder / "meta.json").exists():
                    log.warning("text store %s is damaged (%s): writing it again", folder, why)
                remove_abandoned(folder.parent)
                with atomic_dir(folder, folder.with_name(f"{key}.tmp{os.getpid()}")) as tmp:
                    _write(source, tmp, reading)
    return TextStore(folder)


def damage(folder: Path) -> str | None:
    """What is wrong with a stored corpus (None: nothing): not written yet, or a file of another size than its
    offsets say (checked at every open: cheap)."""
    if not (folder / "meta.json").exists():
        return "not written yet"
    for name in ("train", "ids", "heldout"):
        try:
            expected = int(np.load(folder / f"{name}.offsets.npy", mmap_mode="r")[-1])
            size = (folder / f"{name}.bin").stat().st_size
        except (OSError, ValueError, IndexError):
            return f"{name} unreadable"
        if size != expected:
            return f"{name}.bin holds {size} bytes, its offsets say {expected}"
    return None


def _write(source: str | Path, out: Path, reading: CorpusReading) -> None:
    stats = CorpusStats()
    train, ids, held_out = _Writer(out, "train"), _Writer(out, "ids"), _Writer(out, "heldout")
    digest = hashlib.blake2b(digest_size=8)  # of the ids joined by newlines: what names the corpus's order
    for doc_id, text in iter_documents(source, reading, stats):
        stats.documents += 1
        stats.bytes += len(text)
        if is_held_out(doc_id, reading.eval_fraction):
            held_out.add(text)
            continue
        digest.update(("\n" if len(ids.offsets) > 1 else "").encode() + doc_id.encode())
        train.add(text)
        ids.add(doc_id)
    for writer in (train, ids, held_out):
        writer.close()
    if len(train.offsets) == 1:
        raise DataError(f"corpus '{source}' has no usable text "
                        f"(files skipped: {dict(stats.skipped) or 'none'})")
    meta = {"source": str(source), "documents": len(train.offsets) - 1, "held_out": len(held_out.offsets) - 1,
            "ids_digest": digest.hexdigest(), "stats": stats.to_dict()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
