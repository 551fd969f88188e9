"""``scratchlm prepare``: a corpus tokenized and scored by a teacher before training, resumably, as a user
runs it; and a training run that reads the soft labels with no teacher running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import random_model_folder

from scratchlm import faults
from scratchlm.data.reading import SoftLabelReading
from scratchlm.model.config import ModelConfig

# A one-layer teacher with Phi-2's vocabulary: quick to score with, a real distribution all the same.
SMALL = ModelConfig(name="small-teacher", n_layer=1, n_embd=64, n_head=2, intermediate_size=128,
                    block_size=128)


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory, tokenizer) -> Path:
    return random_model_folder(tmp_path_factory.mktemp("teacher") / "small-teacher", SMALL, tokenizer)


@pytest.fixture(scope="module")
def two_files(corpus_dir, tmp_path_factory) -> Path:
    """Two real texts, two token shards: two pieces of work."""
    out = tmp_path_factory.mktemp("two-files")
    for name in ("pg11_alices_adventures_in_wonderland.txt", "pg84_frankenstein.txt"):
        (out / name).write_text((corpus_dir / "books" / name).read_text()[:60_000])
    return out


def _prepare(corpus: Path, teacher: Path, cache: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scratchlm", "prepare", "--data", str(corpus), "--teacher",
                             f"local:{teacher}", "--soft-labels", "8", "--device", "cpu", "--num-proc", "1"],
                            env={**os.environ, "SCRATCHLM_CACHE": str(cache), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _soft_files(cache: Path) -> dict[str, bytes]:
    (folder,) = (cache / "tokens").glob("*/soft/*-k8")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".bin"}


def test_prepare_killed_midway_and_run_again_gives_the_bytes_of_one_run(two_files, small_teacher, tmp_path):
    first = _prepare(two_files, small_teacher, tmp_path / "killed", **{faults.ENV: "soft-label-piece=30"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed" / "tokens").glob("*/soft/*-k8/*.json")):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.2)
    first.kill()  # after its first piece, before the second
    first.wait()
    done = list((tmp_path / "killed" / "tokens").glob("*/soft/*-k8/*.json"))
    assert len(done) == 1 and not list((tmp_path / "killed" / "tokens").glob("*/soft/*-k8/meta.json"))
    again = _prepare(two_files, small_teacher, tmp_path / "killed")
    whole = _prepare(two_files, small_teacher, tmp_path / "whole")
    outputs = [again.communicate(timeout=300)[0], whole.communicate(timeout=300)[0]]
    assert again.returncode == whole.returncode == 0, outputs
    assert '"soft_labels"' in outputs[0] and '"train_tokens"' in outputs[0]
    killed, straight = _soft_files(tmp_path / "killed"), _soft_files(tmp_path / "whole")
    assert len(straight) == 4 and killed == straight  # two pieces, ids and log-probabilities each


# A prepared row is checked against the teacher rescored in float32 by what a change of precision keeps,
# not by the order of its top ids: on a barely trained teacher the top 5 are near-tied, so bf16 (prepare's
# precision on a CPU with native bf16) and float32 swap neighbours. Each prepared id must sit in float32's
# top RESCORED with the log-probability prepare stored, within LOGPROB_TOL: a half ulp of bf16 at
# |log p| <= 16 is 2^-5, plus float16 storage (2^-7 there) and the logits' own rounding. A row shifted by
# one position holds another token's distribution, so almost none of its ids match.
RESCORED = 64
LOGPROB_TOL = 0.05


@pytest.fixture(scope="module")
def prepared_batch(two_files, small_teacher, tmp_path_factory, tokenizer):
    """prepare's soft labels read by a run's loader, with no teacher running; the run's first batch, the index
    of its first row's block in the stream, and the teacher's float32 rescoring of the stream."""
    from scratchlm.data import tokenize_corpus
    from scratchlm.data.pipeline import DataRequest, build_data
    from scratchlm.teacher.backends import LocalTeacher

    cache = tmp_path_factory.mktemp("prepared") / "cache"
    assert _prepare(two_files, small_teacher, cache).wait(timeout=300) == 0
    prepared = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SCRATCHLM_CACHE", str(cache))
        request = DataRequest(str(two_files), block_size=64, batch_size=4, eval_blocks=1, seed=1337,
                              verify_cache=False, soft=SoftLabelReading(soft_labels=5))
        data = build_data(request, tokenizer)
        batch = next(data.batches)
        data.close()
        # The run read the cache as prepare left it: nothing tokenized, written or rewritten.
        assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == prepared
        arrays = tokenize_corpus(two_files, tokenizer, progress=False).train.arrays
    train = np.concatenate(arrays).astype(np.int64)
    blocks = train[: len(train) // 65 * 65].reshape(-1, 65)
    row = np.concatenate([batch.inputs[0].numpy(), batch.targets[0, -1:].numpy()])
    (b,) = np.flatnonzero((blocks == row).all(axis=1))
    teacher = LocalTeacher(str(small_teacher), device="cpu", dtype=torch.float32)
    # Each shard scored alone, as prepare did.
    scored = teacher.score([a.astype(np.int64).tolist() for a in arrays], RESCORED)
    teacher.close()
    return batch, b, scored, cache


@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "shifted-by-one-fails"])
def test_a_run_reads_prepared_soft_labels_with_no_teacher_running(prepared_batch, shift):
    batch, b, scored, _ = prepared_batch
    assert batch.soft.ids.shape == (4, 64, 5) and batch.soft.mask.float().mean() > 0.95
    # Each target's row is the teacher's distribution at that token of the stream: the same as scoring the
    # stream again in float32.
    # The row of token j of the stream at index j (a shard's first token has none: a row of zeros here).
    ids = np.concatenate([np.concatenate([np.zeros((1, RESCORED), np.int32), s.ids]) for s in scored])
    lps = np.concatenate([np.concatenate([np.zeros((1, RESCORED), np.float32), s.logprobs]) for s in scored])
    targets = slice(b * 65 + 1 + shift, b * 65 + 65 + shift)
    got_ids, got_lps = batch.soft.ids[0].numpy().astype(np.int64), batch.soft.logprobs[0].float().numpy()
    mask = batch.soft.mask[0].numpy()
    # For each prepared (row, id): where float32 puts that id, and whether its log-probability agrees.
    found = got_ids[:, :, None] == ids[targets][:, None, :]  # (64, 5, RESCORED)
    rescored_lp = np.where(found, lps[targets][:, None, :], -np.inf).max(axis=2)
    agree = found.any(axis=2) & (np.abs(rescored_lp - got_lps) <= LOGPROB_TOL)
    share = agree[mask].mean()
    if shift:
        assert share < 0.2, f"a row shifted by one position still matched ({share:.3f}): a check too weak"
    else:
        assert share > 0.98, share
        # The values a row holds, in its own order, are float32's top 5 values (a swap of near-tied ids keeps
        # the sorted values).
        assert np.allclose(got_lps[mask], lps[targets][:, :5][mask], atol=LOGPROB_TOL)


def test_a_damaged_soft_label_shard_is_named_and_prepare_scores_it_again(prepared_batch, two_files,
                                                                         small_teacher, tmp_path, tokenizer,
                                                                         monkeypatch):
    """Pieces are checked as token shards are: a piece cut short is named at the open, NaN written over one
    when a batch reads it, flipped bytes by its checksum (--verify-cache); prepare scores what is damaged
    again, to the bytes of the first build."""
    import shutil

    from scratchlm.data import DataError
    from scratchlm.data.pipeline import DataRequest, build_data

    cache = tmp_path / "cache"
    shutil.copytree(prepared_batch[3], cache)
    monkeypatch.setenv("SCRATCHLM_CACHE", str(cache))
    (folder,) = cache.glob("tokens/*/soft/*-k8")
    first = sorted(folder.glob("*.logprobs.bin"))[0]
    piece = first.name.split(".logprobs")[0]
    original = {p.name: p.read_bytes() for p in folder.glob("*.bin")}

    def first_batch(verify: bool = False) -> None:
        request = DataRequest(str(two_files), block_size=64, batch_size=64, eval_blocks=1, seed=1337,
                              verify_cache=verify, soft=SoftLabelReading(soft_labels=8))
        data = build_data(request, tokenizer)
        try:
            for _ in range(8):  # far enough into the epoch to read every piece
                next(data.batches)
        finally:
            data.close()

    first.write_bytes(original[first.name][: len(original[first.name]) // 2])
    with pytest.raises(DataError, match=rf"piece {piece}: {first.name} holds .* bytes.*scratchlm prepare"):
        first_batch()
    nan = np.frombuffer(original[first.name], np.float16).copy().reshape(-1, 8)
    nan[:, 1:] = np.nan  # every column but the first: the mask still says "labelled"
    first.write_bytes(nan.tobytes())
    with pytest.raises(DataError, match=rf"piece {piece} holds NaN"):
        first_batch()
    flipped = bytearray(original[first.name])
    flipped[4096:8192] = bytes(b ^ 0x01 for b in flipped[4096:8192])  # values still plausible
    first.write_bytes(bytes(flipped))
    first_batch()  # sizes and values pass; only the checksum can tell
    with pytest.raises(DataError, match=rf"piece {piece}: {first.name} differs from its checksum"):
        first_batch(verify=True)
    assert _prepare(two_files, small_teacher, cache).wait(timeout=300) == 0
    assert {p.name: p.read_bytes() for p in folder.glob("*.bin")} == original


def test_prepare_refuses_a_top_k_beyond_its_bound_and_leaves_nothing(two_files, small_teacher, tmp_path):
    done = subprocess.run([sys.executable, "-m", "scratchlm", "prepare", "--data", str(two_files),
                           "--teacher", f"local:{small_teacher}", "--soft-labels", "1000000"],
                          capture_output=True, text=True,
                          env={**os.environ, "SCRATCHLM_CACHE": str(tmp_path / "cache")}, timeout=120)
    assert done.returncode != 0 and "100" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*-k1000000"))
