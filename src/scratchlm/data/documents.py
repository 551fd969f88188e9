"""Reading a corpus into documents: formats, size caps, bad files skipped and counted, the held-out split.

A corpus is a Hugging Face dataset (``hf:NAME[:CONFIG][@SPLIT]``), or a zip of text files (the seed's
``sample.zip``), a folder, a ``.txt``, ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (a ``text`` field, or
another) or ``.parquet`` (a ``text`` column, or another). Every file is streamed (text in blocks, JSON lines
one by one, parquet a record batch at a time), so a file's size does not matter. Text is cut into documents of
at most ``chunk_chars`` characters at paragraph breaks. A fixed share of documents, chosen by a hash of their
id (so the same for every run and seed), is held out for evaluation and never trained on.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError
from .hf_spec import HF_PREFIX, parse_hf
from .reading import CorpusReading
from .splitting import Splitter, split_paragraphs

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
MEMBER_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
SUFFIXES = MEMBER_SUFFIXES + (".zip",)
READ_BLOCK = 2**20
"""Bytes of a text file read at a time."""
MAX_MEMBER_BYTES = 256 * 2**20
"""Largest zip member read (decompressed). Plain files have no limit: they are streamed."""
MAX_COMPRESSION_RATIO = 100
"""A zip member (over 1 MiB) compressed more than this is skipped: text packs 3–10:1, a zip bomb 1000:1."""
MAX_ARCHIVE_BYTES = 64 * 2**30
"""Most bytes decompressed from one zip archive: members beyond are skipped and counted."""


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

    def merge(self, other: dict) -> None:
        """Add the counts of another reading (``to_dict``'s form: a worker's)."""
        self.files_read += other["files_read"]
        self.documents += other["documents"]
        self.bytes += other["bytes"]
        self.skipped.update(other["skipped"])


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
        if path.name.endswith(SUFFIXES):
            files.append(path)
    return files


def _text_documents(stream: BinaryIO, name: str, chunk_chars: int, stats: CorpusStats) -> Iterator[str]:
    """A text file's documents, read in blocks (memory: a block and a few documents, whatever the file's
    size).

    A file with a NUL byte is binary: skipped, from that block on (a small file, whole). So is one that is not
    UTF-8.
    """
    raw = stream.read(READ_BLOCK)
    if len(raw) < READ_BLOCK:  # the whole file in one block: the checks apply to all of it
        if not raw.strip():
            stats.skip(name, "empty")
        elif b"\x00" in raw:
            stats.skip(name, "binary")
        else:
            try:
                yield from split_paragraphs(raw.decode("utf-8"), chunk_chars)
            except UnicodeDecodeError:
                stats.skip(name, "not UTF-8")
        return
    decoder, splitter = codecs.getincrementaldecoder("utf-8")(), Splitter(chunk_chars)
    while raw:
        if b"\x00" in raw:
            stats.skip(name, "binary")
            return
        try:
            text = decoder.decode(raw)
        except UnicodeDecodeError:
            stats.skip(name, "not UTF-8")
            return
        yield from splitter.feed(text)
        raw = stream.read(READ_BLOCK)
    yield from splitter.finish()


def _decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError("reading .zst needs zstandard: pip install 'scratchlm[data]'") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(stream))  # iterable by lines
    return stream


def _json_text(line: bytes, text_field: str) -> str | None:
    """The text of one JSON line; None if it has none; ValueError if the line is not usable JSON text."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError; nesting can be too deep
        raise ValueError("bad JSON line") from err
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON allows it, UTF-8 does not
        raise ValueError("JSON line with invalid Unicode (a lone surrogate)") from None
    return text


def _jsonl_texts(stream: BinaryIO, name: str, stats: CorpusStats,
                 text_field: str) -> Iterator[tuple[int, str]]:
    """(line index, ``text_field`` value) of a JSON-lines file (plain, .gz or .zst), line by line."""
    lines = enumerate(_decompressed(stream, name), 1)
    while True:
        try:
            line_no, line = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as err:  # flipped bits, a truncated download
            stats.skip(name, f"corrupt compressed file ({type(err).__name__})")
            return
        if not line.strip():
            continue
        try:
            text = _json_text(line, text_field)
        except ValueError as err:
            stats.skip(f"{name}:{line_no}", str(err))
            continue
        if text is not None:
            yield line_no - 1, text


def _parquet_texts(source, name: str, stats: CorpusStats, text_field: str, row_group: int | None = None,
                   first: int = 0) -> Iterator[tuple[int, str]]:
    """(row index, ``text_field`` value) of a parquet file, or of one of its row groups (whose first row is
    row ``first`` of the file), a record batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'scratchlm[parquet]'") from None
    try:
        parquet = pq.ParquetFile(source)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as err:
        stats.skip(name, f"not a readable parquet file ({type(err).__name__})")
        return
    if text_field not in schema.names:
        stats.skip(name, f"no '{text_field}' column")
        return
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        stats.skip(name, f"'{text_field}' column is not text")
        return
    groups = None if row_group is None else [row_group]
    try:
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024, row_groups=groups):
            rows = batch.column(0).to_pylist()
            yield from ((first + k, t) for k, t in enumerate(rows) if t and t.strip())
            first += len(rows)
    except (pa.ArrowException, OSError) as err:
        stats.skip(name, f"corrupt parquet file ({type(err).__name__})")


def _records(stream: BinaryIO, unit: Unit, chunk_chars: int, stats: CorpusStats,
             text_field: str) -> Iterator[tuple[int, str]]:
    """(record index, text) of a unit: a text file is record 0, cut into documents as it is read."""
    name = unit.label
    if name.endswith(TEXT_SUFFIXES):
        yield from ((0, piece) for piece in _text_documents(stream, name, chunk_chars, stats))
    elif name.endswith(".parquet"):
        yield from _parquet_texts(stream, name, stats, text_field, unit.row_group, unit.first_record)
    else:
        yield from _jsonl_texts(stream, name, stats, text_field)


def _documents(records: Iterator[tuple[int, str]], unit: Unit, chunk_chars: int,
               stats: CorpusStats) -> Iterator[tuple[str, str]]:
    """(id, text) of a unit's documents: record i's piece j is ``name#i.j``."""
    n = 0
    if unit.label.endswith(TEXT_SUFFIXES):  # already cut as it was read: its pieces numbered in order
        pieces = ((i, j, piece) for j, (i, piece) in enumerate(records))
    else:
        pieces = ((i, j, piece) for i, text in records
                  for j, piece in enumerate(split_paragraphs(text, chunk_chars)))
    for i, j, piece in pieces:
        if piece.strip():
            n += 1
            yield f"{unit.label}#{i}.{j}", piece
    if n:
        stats.files_read += 1


def _zip_members(archive: zipfile.ZipFile, label: str, stats: CorpusStats) -> Iterator[zipfile.ZipInfo]:
    """The members worth reading, by their headers: bombs (too large, too compressed, too much in all) are
    skipped and counted before a byte of them is decompressed."""
    total = 0
    for info in sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename):
        name = f"{label}/{info.filename}"
        if not info.filename.endswith(MEMBER_SUFFIXES):
            stats.skip(name, "not a text, jsonl or parquet member")
        elif info.file_size > MAX_MEMBER_BYTES:
            stats.skip(name, f"larger than {MAX_MEMBER_BYTES // 2**20} MiB")
        elif info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1) and info.file_size > 2**20:
            stats.skip(name, f"compressed more than {MAX_COMPRESSION_RATIO}:1 (a zip bomb?)")
        elif total + info.file_size > MAX_ARCHIVE_BYTES:
            stats.skip(name, f"beyond {MAX_ARCHIVE_BYTES // 2**30} GiB decompressed from one archive")
        else:
            total += info.file_size
            yield info


@dataclass(frozen=True)
class Unit:
    """A part of a corpus that can be read on its own (a file, a zip member, a parquet row group), in the
    order of the corpus: workers tokenize units in parallel and the result is the same as reading them in
    turn."""

    path: str
    """The file (for a member, the archive)."""
    label: str
    """Its name in document ids."""
    member: str | None = None
    row_group: int | None = None
    first_record: int = 0
    """Index of the unit's first record in its file (a row group's first row)."""
    bytes: int = 0
    """Roughly what reading it costs (for progress)."""


def _zip_units(path: Path, label: str, stats: CorpusStats) -> list[Unit]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = list(_zip_members(archive, label, stats))
    except (zipfile.BadZipFile, OSError) as err:
        stats.skip(label, f"not a readable zip ({err})")
        return []
    return [Unit(str(path), f"{label}/{m.filename}", member=m.filename,
                 bytes=m.compress_size) for m in members]


def _parquet_units(path: Path, label: str) -> list[Unit]:
    """A unit per row group; a file that cannot be read as parquet is one unit, skipped when it is read."""
    try:
        import pyarrow.parquet as pq

        metadata = pq.ParquetFile(path).metadata
    except Exception:  # not parquet, or no pyarrow: reading the unit says which
        return [Unit(str(path), label, bytes=path.stat().st_size)]
    units, first, size = [], 0, path.stat().st_size
    for k in range(metadata.num_row_groups):
        rows = metadata.row_group(k).num_rows
        units.append(Unit(str(path), label, row_group=k, first_record=first,
                          bytes=size * rows // max(1, metadata.num_rows)))
        first += rows
    return units


def _hf_rows(spec: str):
    """A Hugging Face dataset's rows, streamed: a folder written by ``save_to_disk``, a folder of parquet or
    arrow files, or a hub id (``datasets.load_dataset(..., streaming=True)``)."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf: corpora need the datasets package: pip install 'scratchlm[data]'") from None
    name, config, split = parse_hf(spec)
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.is_dir():  # a path, not a hub id
        raise DataError(f"{spec}: the dataset folder '{name}' does not exist")
    try:
        if local.is_dir() and any((local / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(local))
            return dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        if local.is_dir():
            files = sorted(str(p) for p in local.rglob("*") if p.suffix in (".parquet", ".arrow"))
            kind = "parquet" if files and files[0].endswith(".parquet") else "arrow"
            return datasets.load_dataset(kind, data_files=files, split=split, streaming=True)
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (KeyError, ValueError, FileNotFoundError, OSError) as err:
        raise DataError(f"cannot read the dataset {spec}: {err}") from None


def _hf_texts(unit: Unit, stats: CorpusStats, text_field: str) -> Iterator[tuple[int, str]]:
    for i, row in enumerate(_hf_rows(unit.path)):
        if text_field not in row:
            stats.skip(unit.label, f"no '{text_field}' column")
            return
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield i, text


def corpus_units(source: str | Path, stats: CorpusStats | None = None) -> list[Unit]:
    """The units of a corpus, in order (a zip's members by their headers: bombs are skipped here, unread)."""
    stats = stats if stats is not None else CorpusStats()
    if str(source).startswith(HF_PREFIX):  # read in one stream
        return [Unit(str(source), str(source), member=HF_PREFIX)]
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"corpus '{source}' does not exist")
    units: list[Unit] = []
    for path in _corpus_files(root, stats) if root.is_dir() else [root]:
        label = str(path.relative_to(root)) if root.is_dir() else path.name
        if path.suffix == ".zip":
            units += _zip_units(path, label, stats)
        elif path.name.endswith(".parquet"):
            units += _parquet_units(path, label)
        elif path.name.endswith(MEMBER_SUFFIXES):
            units.append(Unit(str(path), label, bytes=path.stat().st_size))
        else:
            raise DataError(f"'{source}': unsupported corpus format (use a folder, .zip, .txt, .jsonl, "
                            ".jsonl.gz, .jsonl.zst, .parquet)")
    return units


@contextmanager
def _opened(unit: Unit) -> Iterator[BinaryIO]:
    if unit.member is None:
        with open(unit.path, "rb") as f:
            yield f
        return
    with zipfile.ZipFile(unit.path) as archive, archive.open(unit.member) as member:
        # parquet needs to seek: read it (within the member cap) into memory.
        yield io.BytesIO(member.read()) if unit.label.endswith(".parquet") else member


def unit_documents(unit: Unit, reading: CorpusReading | None = None,
                   stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """(document id, text) for every document of one unit, cut as ``reading`` says (default: its defaults);
    a bad unit is skipped and counted."""
    reading = reading or CorpusReading()
    chunk_chars, text_field = reading.chunk_chars, reading.text_field
    stats = stats if stats is not None else CorpusStats()
    if unit.member == HF_PREFIX:
        yield from _documents(_hf_texts(unit, stats, text_field), unit, chunk_chars, stats)
        return
    try:
        with _opened(unit) as stream:
            yield from _documents(_records(stream, unit, chunk_chars, stats, text_field), unit, chunk_chars,
                                  stats)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError):
        stats.skip(unit.label, "corrupt zip member")
    except OSError as err:
        stats.skip(unit.label, f"unreadable ({err.strerror or err})")


def iter_documents(source: str | Path, reading: CorpusReading | None = None,
                   stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
    """(document id, text) for every document of a corpus, cut as ``reading`` says, in a fixed order. Bad
    files are skipped and counted; files are streamed, so their size does not matter."""
    stats = stats if stats is not None else CorpusStats()
    for unit in corpus_units(source, stats):
        yield from unit_documents(unit, reading, stats)
