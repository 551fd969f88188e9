"""Corpus reading, the held-out split and the block loader's contract: coverage, determinism, disjointness."""

import gzip
import hashlib
import json
import time
import zipfile

import numpy as np
import pytest

from scratchlm.data import (
    CorpusStats,
    DataError,
    is_held_out,
    iter_documents,
    parse_data_list,
    split_paragraphs,
    tokenize_corpus,
)
from scratchlm.data.loaders import BlockLoader, DataPosition, MixedBlockLoader
from scratchlm.data.reading import CorpusReading

HELD_OUT_5PC = CorpusReading(eval_fraction=0.05)  # small corpora keep a held-out block


def test_split_paragraphs_respects_the_limit_and_keeps_text():
    text = "\n\n".join(f"paragraph {i} " + "word " * (i % 40) for i in range(300)) + "\n\n" + "x" * 5000
    pieces = list(split_paragraphs(text, 1000))
    assert all(len(p) <= 1000 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_bad_files_are_skipped_and_counted(tmp_path, corpus_dir):
    good = (corpus_dir / "books" / "pg11_alices_adventures_in_wonderland.txt").read_bytes()
    zpath = tmp_path / "sample.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("good.txt", good)
        z.writestr("corrupt.txt", b"some text that will be damaged " * 500)
        z.writestr("empty.txt", b"")
        z.writestr("binary.txt", bytes(range(256)) * 50)
    raw = bytearray(zpath.read_bytes())
    at = raw.find(b"corrupt.txt") + 40  # inside the compressed data of that member
    raw[at : at + 20] = b"\xff" * 20
    zpath.write_bytes(bytes(raw))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    stats = CorpusStats()
    docs = list(iter_documents(tmp_path, stats=stats))
    assert docs and all(doc_id.startswith("sample.zip/good.txt") for doc_id, _ in docs)
    assert "".join(t for _, t in docs).replace("\n", "") == good.decode().replace("\n", "")
    assert stats.skipped["empty"] == 1 and stats.skipped["binary"] == 1 and stats.skipped["not UTF-8"] == 1
    assert sum(n for reason, n in stats.skipped.items() if reason.startswith("corrupt zip member")) == 1


def test_held_out_split_is_fixed_and_proportional():
    # Pinned: a change to the hash would silently move documents between training and evaluation, and make
    # losses of old and new runs incomparable.
    ids = [f"file{i}.txt#0.{j}" for i in range(100) for j in range(100)]
    held = [d for d in ids if is_held_out(d, 0.05)]
    assert held[:12] == ["file0.txt#0.15", "file0.txt#0.23", "file0.txt#0.29", "file0.txt#0.32",
                         "file0.txt#0.47",
                         "file0.txt#0.48", "file0.txt#0.64", "file1.txt#0.52", "file1.txt#0.58",
                         "file1.txt#0.72",
                         "file1.txt#0.94", "file2.txt#0.14"]
    assert len(held) == 481  # 4.81% of 10,000 at a fraction of 5%
    assert hashlib.blake2b("\n".join(held).encode(), digest_size=8).hexdigest() == "414dc357b9b928c4"


def test_tokenized_corpus_keeps_eval_documents_out_of_training(small_corpus, tokenizer):
    corpus = tokenize_corpus(small_corpus, tokenizer, CorpusReading(eval_fraction=0.1), progress=False)
    held_texts = [t for d, t in iter_documents(small_corpus) if is_held_out(d, 0.1)]
    assert corpus.meta["val_documents"] == len(held_texts) > 0
    expected_val = sum(len(ids) + 1 for ids in tokenizer.encode_batch(held_texts))
    assert corpus.meta["val_tokens"] == expected_val == len(corpus.val)
    eot_positions = np.flatnonzero(np.asarray(corpus.train) == tokenizer.eot_id)
    assert len(eot_positions) == corpus.meta["train_documents"]  # one <|endoftext|> after each document


def test_block_loader_is_deterministic_disjoint_and_resumable():
    tokens = np.arange(65 * 40, dtype=np.uint16)  # 40 blocks of T+1 = 65
    ranks = [BlockLoader(tokens, 64, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(5):  # one epoch: 40 blocks / (2 ranks × 4)
        for loader in ranks:
            batch = loader.next_batch()
            assert batch.inputs.shape == (4, 64)
            assert (batch.targets[:, :-1] == batch.inputs[:, 1:]).all()
            seen += [int(b[0]) // 65 for b in batch.inputs]
    assert sorted(seen) == list(range(40))  # each block exactly once per epoch, no rank overlap
    again = BlockLoader(tokens, 64, 4, seed=7, rank=0, world_size=2)
    first = [again.next_batch().inputs for _ in range(3)]
    resumed = BlockLoader(tokens, 64, 4, seed=7, rank=0, world_size=2, position=DataPosition(0, 16))
    assert (resumed.next_batch().inputs == first[2]).all()
    assert ranks[0].next_batch().position["epoch"] == 1


def test_mixed_loader_holds_the_weights_upsamples_and_resumes_exactly():
    # Source 0: 10 blocks whose tokens are all < 1000; source 1: 50 blocks, all ≥ 1000. Weight 3:1 toward the
    # small one.
    small = np.arange(65 * 10, dtype=np.uint16)
    large = np.arange(1000, 1000 + 65 * 50, dtype=np.uint16)
    ranks = [MixedBlockLoader([small, large], [3, 1], 64, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    per_rank: list[list[int]] = [[], []]
    for _ in range(10):  # 80 blocks in all
        positions = []
        for r, loader in enumerate(ranks):
            batch = loader.next_batch()
            assert (batch.targets[:, :-1] == batch.inputs[:, 1:]).all()
            per_rank[r] += [int(b[0]) for b in batch.inputs]
            positions.append(batch.position)
        assert positions[0] == positions[1]  # every rank follows the whole stream
    blocks = per_rank[0] + per_rank[1]
    assert sum(b < 1000 for b in blocks) == 60  # exactly 3/4 from the small source...
    # ...so each of its blocks 6 times
    assert sorted({b for b in blocks if b < 1000}) == [65 * i for i in range(10)]
    large_seen = [b for b in blocks if b >= 1000]
    # the large one sampled, without repeats within an epoch
    assert len(set(large_seen)) == len(large_seen) == 20
    position = ranks[1].next_batch().position
    ahead = [ranks[1].next_batch().inputs for _ in range(2)]
    resumed = MixedBlockLoader([small, large], [3, 1], 64, 4, seed=7, position=position, rank=1, world_size=2)
    for expected in ahead:
        assert (resumed.next_batch().inputs == expected).all()
    with pytest.raises(DataError, match="same --data list"):
        MixedBlockLoader([small], [1], 64, 4, seed=7, position=position)
    with pytest.raises(DataError, match="tiny.txt has 10 training tokens, fewer than one block of 65"):
        MixedBlockLoader([small, np.zeros(10, np.uint16)], [1, 1], 64, 4, seed=7, names=["books", "tiny.txt"])


def test_data_list_parsing(tmp_path):
    a, b = tmp_path / "wiki", tmp_path / "code.txt"
    a.mkdir()
    b.write_text("x")
    assert [(s.name, s.weight) for s in parse_data_list(f"{a}:0.7,{b}:0.3")] == [("wiki", 0.7),
                                                                                 ("code.txt", 0.3)]
    assert [s.weight for s in parse_data_list(f"{a},{b}:2")] == [1.0, 2.0]
    odd = tmp_path / "odd,name:1"
    odd.mkdir()
    assert [s.path for s in parse_data_list(str(odd))] == [str(odd)]  # an existing path is taken whole
    for spec, message in ((f"{a}:x,{b}", "must be a number"), (f"{a}:0,{b}", "positive"),
                          (f"{a},{tmp_path}/missing:1", "does not exist"),
                          (f"{a},{tmp_path}/x/wiki:1", "does not exist")):
        with pytest.raises(DataError, match=message):
            parse_data_list(spec)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "wiki").mkdir()
    with pytest.raises(DataError, match="named alike"):
        parse_data_list(f"{a},{tmp_path}/x/wiki")


def test_build_data_is_the_one_entry_point_for_a_corpus_and_a_mix(small_corpus, corpus_dir, tokenizer,
                                                                  tmp_path):
    from scratchlm.data.pipeline import DataRequest, build_data

    request = DataRequest(str(small_corpus), block_size=64, batch_size=4, eval_blocks=6, seed=1,
                          verify_cache=False, reading=HELD_OUT_5PC)
    one = build_data(request, tokenizer)
    try:
        assert one.kind == "corpus" and one.eval_set.shape == (6, 65) and not one.eval_groups
        first = next(one.batches)
        assert first.inputs.shape == (4, 64) and (first.targets[:, :-1] == first.inputs[:, 1:]).all()
        assert first.position == {"kind": "corpus", "epoch": 0, "index": 4}
        second = next(one.batches)
    finally:
        one.close()
    resumed = build_data(request, tokenizer, position=first.position)  # from a saved position: the next batch
    try:
        assert (next(resumed.batches).inputs == second.inputs).all()
    finally:
        resumed.close()

    code = tmp_path / "code.txt"
    code.write_bytes((corpus_dir / "code" / "python_click.txt").read_bytes())
    mixed = DataRequest(f"{small_corpus}:3,{code}:1", 64, 4, 8, 1, False, reading=HELD_OUT_5PC)
    mix = build_data(mixed, tokenizer)
    try:
        assert mix.kind == "mix" and mix.eval_groups == {small_corpus.name: (0, 6), "code.txt": (6, 8)}
        assert next(mix.batches).position["kind"] == "mix"
    finally:
        mix.close()
    with pytest.raises(DataError, match="saved training on one corpus .* same --data list"):
        build_data(mixed, tokenizer, position=first.position)


@pytest.mark.slow
def test_hostile_corpora(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "huge_line.txt").write_text("word " * 400_000)  # 2 MB, no newline at all
    with zipfile.ZipFile(root / "empty.zip", "w"):
        pass
    with zipfile.ZipFile(root / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.txt", b"a" * (257 * 2**20))  # 257 MiB that packs into well under 1 MB
    outside = tmp_path / "secret.txt"
    outside.write_text("never to be read " * 100)
    (root / "link.txt").symlink_to(outside)
    assert (root / "bomb.zip").stat().st_size < 2**20
    stats = CorpusStats()
    docs = list(iter_documents(root, stats=stats))
    assert docs and all(len(t) <= 8000 for _, t in docs)  # the huge line is served in pieces
    assert sum(len(t) for _, t in docs) >= 1_999_000
    assert all("never to be read" not in t for _, t in docs)
    assert stats.skipped["link pointing outside the corpus folder"] == 1
    assert stats.skipped["larger than 256 MiB"] == 1


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
