"""Data at scale: readers whose memory does not grow with the file, Hugging Face datasets from a local folder,
tokenization in worker processes (the same shards as one process, resumed after an interruption) and a feed
that keeps its documents on disk."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scratchlm.data import CorpusReading, DataError, corpus_units, iter_documents, tokenize_corpus
from scratchlm.data import token_cache as token_cache_module

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

BOOKS = ("pg11_alices_adventures_in_wonderland.txt", "pg1342_pride_and_prejudice.txt",
         "pg84_frankenstein.txt")


@pytest.fixture(scope="module")
def paragraphs(corpus_dir) -> list[str]:
    """Real paragraphs from the corpus (a few MB of text)."""
    found = []
    for path in sorted((corpus_dir / "books").glob("*.txt"))[:12]:
        found += [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return found


def _records(paragraphs: list[str], n_bytes: int) -> list[str]:
    """Records of about 4 kB made of real paragraphs, each copy numbered so that no two are equal, until
    ``n_bytes``."""
    out, size, k = [], 0, 0
    while size < n_bytes:
        text = f"[{k}] " + "\n\n".join(paragraphs[(k * 7 + j) % len(paragraphs)] for j in range(8))[:4000]
        out.append(text)
        size += len(text.encode())
        k += 1
    return out


def _write(path: Path, records: list[str]) -> None:
    """``records`` in the format the suffix names."""
    if path.suffix == ".parquet":  # row groups of ~256 records (~1 MB): what a reader may hold at once
        pq.write_table(pa.table({"content": records}), path, row_group_size=256)
    elif path.suffix == ".txt":
        path.write_text("\n\n".join(records), encoding="utf-8")
    else:
        lines = "".join(json.dumps({"id": k, "content": r}) + "\n" for k, r in enumerate(records)).encode()
        if path.name.endswith(".gz"):
            lines = gzip.compress(lines, compresslevel=1)
        elif path.name.endswith(".zst"):
            lines = zstandard.ZstdCompressor(level=1).compress(lines)
        path.write_bytes(lines)


# Peak RSS is read from VmHWM: getrusage's ru_maxrss survives exec, so a child would report its parent's peak.
_PEAK_RSS = """
def peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
"""
_PEAK_RSS_OF_READING = _PEAK_RSS + """
import sys
from scratchlm.data import CorpusReading, iter_documents
n = sum(1 for _ in iter_documents(sys.argv[1], CorpusReading(text_field="content")))
print(n, peak_rss_mib())
"""


def _peak_rss_of_reading(path: Path) -> tuple[int, int]:
    """(documents, peak RSS in MiB) of a fresh process reading a corpus file to the end."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_READING, str(path)], capture_output=True,
                         text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    documents, peak = out.stdout.split()
    return int(documents), int(peak)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl.gz", ".jsonl.zst", ".txt"])
def test_a_readers_memory_does_not_grow_with_the_file(tmp_path, paragraphs, suffix):
    # A 1.5 GB parquet shard cannot be held whole; here a file grows 10x (6 -> 60 MB) and the reader's peak
    # memory must stay within a bound far under what holding the file would take (60 MB of text is >100 MB
    # as Python strings).
    records = _records(paragraphs, 60 * 2**20)
    small, large = tmp_path / f"small{suffix}", tmp_path / f"large{suffix}"
    _write(small, records[: len(records) // 10])
    _write(large, records)
    small_docs, small_peak = _peak_rss_of_reading(small)
    large_docs, large_peak = _peak_rss_of_reading(large)
    assert large_docs >= 9 * small_docs > 0
    assert large_peak - small_peak < 25, (small_peak, large_peak)


def test_hf_datasets_are_read_from_a_local_folder(tmp_path, tokenizer, paragraphs, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # The hub cannot be reached here: the test writes datasets locally (the hub id path is the same code,
    # datasets.load_dataset with streaming). HF_HUB_OFFLINE makes any attempt to reach it fail at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = _records(paragraphs, 200_000)
    saved = tmp_path / "saved"
    splits = {"train": records, "validation": records[:3]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"content": v}) for k, v in splits.items()}
                         ).save_to_disk(saved)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write(shards / "part-0.parquet", records[:20])
    _write(shards / "part-1.parquet", records[20:])

    for spec, expected in ((f"hf:{saved}", records), (f"hf:{saved}@validation", records[:3]),
                           (f"hf:{shards}", records)):
        texts = [t for _, t in iter_documents(spec, CorpusReading(chunk_chars=10**6, text_field="content"))]
        assert texts == expected, spec
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(f"hf:{tmp_path / 'missing'}"))
    # a library caller may hold out nothing (eval_fraction 0), which no command allows: unvalidated settings
    whole = CorpusReading.model_construct(chunk_chars=10**6, eval_fraction=0.0, text_field="content")
    corpus = tokenize_corpus(f"hf:{saved}", tokenizer, whole, progress=False)
    expected_ids = [i for r in records for i in tokenizer.encode(r) + [tokenizer.eot_id]]
    assert np.array_equal(corpus.train[0 : len(corpus.train)], np.asarray(expected_ids, dtype=np.uint16))


@pytest.fixture
def mixed_corpus(tmp_path, corpus_dir, paragraphs) -> Path:
    """A folder of every format: 2 real books, a parquet file of 5 row groups, jsonl.gz and jsonl.zst."""
    root = tmp_path / "mixed"
    root.mkdir()
    for name in BOOKS[:2]:
        (root / name).write_bytes((corpus_dir / "books" / name).read_bytes())
    records = _records(paragraphs, 3 * 2**20)
    pq.write_table(pa.table({"text": records[:1000]}), root / "web.parquet", row_group_size=200)
    for name, part in (("a.jsonl.gz", records[1000:1200]), ("b.jsonl.zst", records[1200:1400])):
        lines = "".join(json.dumps({"text": r}) + "\n" for r in part).encode()
        (root / name).write_bytes(gzip.compress(lines) if name.endswith(".gz")
                                  else zstandard.ZstdCompressor().compress(lines))
    return root


def _shards(cache: Path) -> dict[str, bytes]:
    (folder,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".bin"}


def test_two_processes_write_the_same_shards_as_one(mixed_corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache_module, "IN_PROCESS_BYTES", 0)  # a small corpus still uses workers
    one = tokenize_corpus(mixed_corpus, tokenizer, cache_dir=tmp_path / "one", progress=False, num_proc=1)
    two = tokenize_corpus(mixed_corpus, tokenizer, cache_dir=tmp_path / "two", progress=False, num_proc=2)
    assert len(corpus_units(mixed_corpus)) == 2 + 5 + 2  # files, row groups: the work is cut finer than files
    assert one.meta == two.meta
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two")
    assert len(one.train) > 500_000 and len(one.val) > 0


def test_an_interrupted_tokenization_keeps_its_finished_shards(mixed_corpus, tokenizer, tmp_path,
                                                                monkeypatch):
    real = token_cache_module._tokenize_unit
    tokenized: list[int] = []

    def interrupted_at_unit_4(job, unit, out, k):
        if k == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the corpus
        tokenized.append(k)
        return real(job, unit, out, k)

    monkeypatch.setattr(token_cache_module, "_tokenize_unit", interrupted_at_unit_4)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(mixed_corpus, tokenizer, cache_dir=tmp_path / "cache", progress=False, num_proc=1)
    assert tokenized == [0, 1, 2, 3]
    (partial,) = (tmp_path / "cache" / "tokens").glob("*.partial")
    finished = {p.name: p.stat().st_mtime_ns for p in partial.iterdir()}

    def counted(job, unit, out, k):
        tokenized.append(k)
        return real(job, unit, out, k)

    tokenized.clear()
    monkeypatch.setattr(token_cache_module, "_tokenize_unit", counted)
    resumed = tokenize_corpus(mixed_corpus, tokenizer, cache_dir=tmp_path / "cache", progress=False,
                              num_proc=1)
    assert tokenized == [4, 5, 6, 7, 8]
    (folder,) = [p for p in (tmp_path / "cache" / "tokens").iterdir()]
    assert all((folder / name).stat().st_mtime_ns == when for name, when in finished.items())
    fresh = tokenize_corpus(mixed_corpus, tokenizer, cache_dir=tmp_path / "fresh", progress=False, num_proc=1)
    assert resumed.meta == fresh.meta and _shards(tmp_path / "cache") == _shards(tmp_path / "fresh")


_FEED_RSS = _PEAK_RSS + """
import sys
from scratchlm.data import CorpusReading
from scratchlm.feed.corpus import CorpusSource, Cursor
corpus = CorpusSource(sys.argv[1], 1337, CorpusReading(text_field="content"))
before = peak_rss_mib()
cursor, served = Cursor(0, 0), 0
for _ in range(200):
    picked, cursor = corpus.take(cursor, 64)
    served += sum(1 for i in picked if corpus.texts[i])
print(len(corpus.texts), served, before, peak_rss_mib())
"""


def test_the_feeds_memory_does_not_grow_with_its_corpus(tmp_path, paragraphs, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    records = _records(paragraphs, 60 * 2**20)
    peaks = []
    for name, part in (("small", records[: len(records) // 10]), ("large", records)):
        path = tmp_path / f"{name}.jsonl"
        _write(path, part)
        for _ in range(2):  # the first run writes the text store; the second is a server's start-up
            out = subprocess.run([sys.executable, "-c", _FEED_RSS, str(path)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        documents, served, started, peak = map(int, out.stdout.split())
        assert documents > 0.9 * len(part) and served == 200 * 64
        peaks.append((started, peak))
    (small_start, small_peak), (large_start, large_peak) = peaks
    # Holding the large corpus's 60 MB as strings would add well over 60 MB.
    assert large_start - small_start < 15 and large_peak - small_peak < 15, peaks


def test_hf_specs_in_data_lists(small_corpus):
    from scratchlm.data import parse_data_list
    from scratchlm.data.hf_spec import parse_hf

    assert parse_hf("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train") == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    assert parse_hf("hf:./local") == ("./local", None, "train")
    (one,) = parse_data_list("hf:HuggingFaceFW/fineweb-edu:sample-10BT")  # a config, not a weight
    assert one.path == "hf:HuggingFaceFW/fineweb-edu:sample-10BT" and one.weight == 1
    mix = parse_data_list(f"hf:org/web:default@train:3,{small_corpus}:1")
    assert [(s.path, s.weight) for s in mix] == [("hf:org/web:default@train", 3.0), (str(small_corpus), 1.0)]
    assert mix[0].name == "org_web:default@train"
