"""The on-disk caches (token shards, the feed's text store) under two builders at once and after damage: built
once, by one process while the other waits, and never trusted when a file is not what was written."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import spawn

from scratchlm import faults
from scratchlm.data import CorpusReading, DataError, tokenize_corpus
from scratchlm.serving import free_port


def _shards(cache: Path) -> dict[str, bytes]:
    (folder,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".bin"}


def test_two_train_processes_on_one_fresh_cache_both_finish_with_the_shards_of_one(small_corpus, tmp_path,
                                                                                   tokenizer):
    # A sweep started at once: both runs need the same cache. Each shard takes 2 s more to finish here (a
    # fault injected for the test), so the second run surely arrives while the first is building.
    env = {**os.environ, "SCRATCHLM_CACHE": str(tmp_path / "cache"), faults.ENV: "token-shard=2"}
    flags = ["--max-steps", "1", "--block-size", "64", "--micro-batch-size", "2", "--eval-batches", "1",
             "--eval-fraction", "0.05", "--num-proc", "1", "--device", "cpu"]
    runs = [subprocess.Popen([sys.executable, "-m", "scratchlm", "train", "--data", str(small_corpus),
                              "--out", str(tmp_path / f"run{k}"), *flags], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("which another process is building" in out for out in outputs) == 1  # one waited, and said
    alone = tmp_path / "alone"
    tokenize_corpus(small_corpus, tokenizer, CorpusReading(eval_fraction=0.05), alone, progress=False,
                    num_proc=1)
    assert _shards(tmp_path / "cache") == _shards(alone)
    assert not list((tmp_path / "cache" / "tokens").glob("*.partial")) and not list(
        (tmp_path / "cache" / "tokens").glob("*.lock"))


def test_two_serve_processes_on_one_fresh_corpus_both_serve(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    ports, servers = [free_port(), free_port()], [None, None]

    def start(k: int) -> None:
        servers[k] = spawn(small_corpus, ports[k])

    threads = [threading.Thread(target=start, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        texts = [httpx.get(f"http://127.0.0.1:{port}/generate").json() for port in ports]
    finally:
        for server in servers:
            if server is not None:
                server.kill()
                server.wait()
    assert texts[0] and texts[0] == texts[1]  # the same store, the same stream
    assert len([p for p in (tmp_path / "cache" / "texts").iterdir() if p.is_dir()]) == 1


@pytest.fixture
def built(small_corpus, tmp_path, tokenizer):
    """A fresh token cache of the small corpus, and its tokens."""
    corpus = tokenize_corpus(small_corpus, tokenizer, cache_dir=tmp_path / "cache", progress=False,
                             num_proc=1)
    (folder,) = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    return folder, np.asarray(corpus.train).copy(), np.asarray(corpus.val).copy()


def _reopen(small_corpus, tmp_path, tokenizer, **kwargs):
    return tokenize_corpus(small_corpus, tokenizer, cache_dir=tmp_path / "cache", progress=False, num_proc=1,
                           **kwargs)


def test_a_shard_cut_short_is_found_when_opened_and_tokenized_again(built, small_corpus, tmp_path, tokenizer,
                                                                     caplog):
    folder, train, val = built
    shard = folder / "000001.train.bin"
    shard.write_bytes(shard.read_bytes()[:-1000])  # a copy interrupted, a full disk
    with caplog.at_level(logging.WARNING, logger="scratchlm"):
        corpus = _reopen(small_corpus, tmp_path, tokenizer)
    assert any("shard 000001 is damaged" in m and "000001.train.bin holds" in m for m in caplog.messages)
    assert np.array_equal(np.asarray(corpus.train), train) and np.array_equal(np.asarray(corpus.val), val)


def test_verify_cache_finds_a_changed_byte_that_sizes_cannot(built, small_corpus, tmp_path, tokenizer,
                                                              caplog):
    folder, train, _ = built
    shard = folder / "000000.train.bin"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # a bad block: the same size, other bytes
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="scratchlm"):
        unchecked = _reopen(small_corpus, tmp_path, tokenizer)
        assert not np.array_equal(np.asarray(unchecked.train), train) and not caplog.messages
        checked = _reopen(small_corpus, tmp_path, tokenizer, verify=True)
    assert any("shard 000000 is damaged" in m and "differs from its checksum" in m for m in caplog.messages)
    assert np.array_equal(np.asarray(checked.train), train)


def test_a_damaged_text_store_is_written_again(small_corpus, tmp_path, caplog):
    from scratchlm.data.text_store import open_text_store

    store = open_text_store(small_corpus, CorpusReading(eval_fraction=0.05), cache_dir=tmp_path)
    first = store.train[0]
    path = store.folder / "train.bin"
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="scratchlm"):
        again = open_text_store(small_corpus, CorpusReading(eval_fraction=0.05), cache_dir=tmp_path)
    assert any("is damaged" in m and "train.bin holds 100 bytes" in m for m in caplog.messages)
    assert again.train[0] == first and len(again.train) == len(store.train)


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
