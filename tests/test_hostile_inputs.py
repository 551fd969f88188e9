"""Hostile corpora and files (issue 13's list): each bad file is skipped and counted, the rest is read, and
nothing raises a traceback. Each case failed before its fix."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from scratchlm.data import CorpusStats, DataError, iter_documents, split_paragraphs, tokenize_corpus

GOOD = "A good document about rivers.\n\nIt has two paragraphs, and nothing wrong with it.\n"


def read(path, **kwargs) -> tuple[list[tuple[str, str]], CorpusStats]:
    stats = CorpusStats()
    return list(iter_documents(path, stats=stats, **kwargs)), stats


def test_a_zip_bomb_split_over_many_members_is_skipped_unread(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(6):  # each under the per-member cap, 1000:1 compressed
            z.writestr(f"part{i}.txt", b"a" * (20 * 2**20))
        z.writestr("good.txt", GOOD)
    assert bomb.stat().st_size < 2**20
    t0 = time.process_time()
    docs, stats = read(bomb)
    assert time.process_time() - t0 < 1.0  # not decompressed: 120 MiB would take longer
    assert [t for _, t in docs] == [GOOD]
    assert stats.skipped["compressed more than 100:1 (a zip bomb?)"] == 6


@pytest.mark.parametrize("mib", [8, 32])
def test_cutting_text_without_blank_lines_takes_linear_time(mib):
    text = "word " * (mib * 2**20 // 5)
    t0 = time.perf_counter()
    pieces = list(split_paragraphs(text, 8000))
    assert time.perf_counter() - t0 < 0.1 * mib  # 32 MiB took 37 s when each cut copied the rest
    assert all(len(p) <= 8000 for p in pieces) and "".join(pieces).replace("\n", "") == text.replace("\n", "")


def write_parquet(path, table) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def test_bad_records_and_files_are_skipped_and_counted(tmp_path, tokenizer):
    import pyarrow as pa

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.txt").write_text(GOOD)
    lines = [json.dumps({"text": "first record, fine"}), "[" * 200_000 + "]" * 200_000,
             '{"text": "a lone surrogate \\ud800 here"}', json.dumps({"text": "last record, fine"})]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    packed = bytearray(gzip.compress("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(2000))
                                     .encode()))
    packed[len(packed) // 2 : len(packed) // 2 + 16] = b"\xff" * 16  # flipped bits mid-stream
    (root / "damaged.jsonl.gz").write_bytes(bytes(packed))
    (root / "nul.txt").write_bytes(GOOD.encode() * 400 + b"\x00" + b"more text")  # NUL after the first 8 KB
    (root / "not-parquet.parquet").write_text("just some text, not parquet")
    write_parquet(root / "no-text.parquet", pa.table({"body": ["x", "y"]}))
    write_parquet(root / "int-text.parquet", pa.table({"text": [1, 2]}))
    write_parquet(root / "list-text.parquet", pa.table({"text": [["a"], ["b"]]}))
    write_parquet(root / "good.parquet", pa.table({"text": ["a parquet row", "another parquet row"]}))
    docs, stats = read(root)
    texts = [t for _, t in docs]
    assert GOOD in texts and "first record, fine" in texts and "last record, fine" in texts
    assert "a parquet row" in texts and not any("\x00" in t for t in texts)
    assert stats.skipped["bad JSON line"] == 1  # 200,000 levels deep: RecursionError, before
    assert stats.skipped["JSON line with invalid Unicode (a lone surrogate)"] == 1
    assert sum(n for r, n in stats.skipped.items() if r.startswith("corrupt compressed file")) == 1
    assert stats.skipped["binary"] == 1
    assert sum(n for r, n in stats.skipped.items() if r.startswith("not a readable parquet file")) == 1
    assert stats.skipped["no 'text' column"] == 1 and stats.skipped["'text' column is not text"] == 2
    # What training reads goes through the tokenizer, which refused a lone surrogate with a traceback.
    corpus = tokenize_corpus(root, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert corpus.meta["train_documents"] + corpus.meta["val_documents"] == len(docs)


def test_a_killed_or_failed_tokenization_leaves_no_temporary_folder(tmp_path, tokenizer, small_corpus):
    tokens = tmp_path / "cache" / "tokens"
    tokens.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tokens / f"0123abcd.tmp{dead.pid}"  # what a killed tokenization leaves
    abandoned.mkdir()
    (abandoned / "train.bin").write_bytes(b"\x00" * 1000)
    alive = tokens / f"4567ef01.tmp{os.getpid()}"  # a tokenization still running: left alone
    alive.mkdir()
    tokenize_corpus(small_corpus, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert not abandoned.exists() and alive.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no usable text"):
        tokenize_corpus(empty, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    # the failed one cleaned up after itself
    assert sorted(p.name for p in tokens.glob("*.tmp*")) == [alive.name]
