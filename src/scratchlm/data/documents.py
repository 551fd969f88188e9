"""Reading a corpus into documents: formats, size caps, bad files skipped and counted, the held-out split.

A corpus is a zip of text files (the seed's ``sample.zip``), a folder, a ``.txt``, ``.jsonl``/``.jsonl.gz``
(``text`` field) or ``.parquet`` (``text`` column). Text files are cut into documents of at most
``chunk_chars`` characters at paragraph breaks. A fixed share of documents, chosen by a hash of their id (so
the same for every run and seed), is held out for evaluation and never trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
MAX_MEMBER_BYTES = 256 * 2**20
"""Largest file or zip member read (decompressed): guards against zip bombs and stray binaries."""


class DataError(UserError, RuntimeError):
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
            log.warning("skipping %s: %s (further files skipped for this reason are only counted)", name,
                        reason)
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
    """Cut text into pieces of at most ``chunk_chars`` at blank lines (at newlines, then anywhere, if
    needed)."""
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


def _member_documents(name: str, raw: bytes, chunk_chars: int,
                      stats: CorpusStats) -> Iterator[tuple[str, str]]:
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
            except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError,
                    NotImplementedError):
                stats.skip(member_label, "corrupt zip member")
                continue
            if raw is not None:
                yield from _member_documents(member_label, raw, chunk_chars, stats)


def iter_documents(source: str | Path, chunk_chars: int = 8000,
                   stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """(document id, text) for every document of a corpus, in a fixed order. Bad files are skipped and
    counted."""
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
            raise DataError(f"'{source}': unsupported corpus format "
                            "(use a folder, .zip, .txt, .jsonl, .parquet)")
        try:
            with open(path, "rb") as f:
                raw = _read_capped(f, label, stats)
        except OSError as err:
            stats.skip(label, f"unreadable ({err.strerror})")
            continue
        if raw is not None:
            yield from _member_documents(label, raw, chunk_chars, stats)


def is_held_out(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the evaluation set: a hash of its id, so fixed across runs and seeds."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


