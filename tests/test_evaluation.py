"""`scratchlm eval`: a loss computed by hand, a window longer than the context, the held-out split written
out."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from scratchlm.evaluation import evaluate_texts
from scratchlm.model.config import PRESETS
from scratchlm.model.hf import save_hf
from scratchlm.model.model import Phi


def test_eval_equals_a_hand_computed_cross_entropy(tokenizer, corpus_dir, tmp_path):
    torch.manual_seed(0)
    model = Phi(PRESETS["phi-tiny"]).eval()
    texts = [(corpus_dir / "books" / "pg84_frankenstein.txt").read_text()[:700], "A second, short document."]
    result = evaluate_texts(model, texts, tokenizer, block_size=32, device=torch.device("cpu"),
                            progress=False)

    ids = []
    for t in texts:  # joined with <|endoftext|> after each document
        ids += tokenizer.encode(t) + [50256]
    nats, count = 0.0, 0
    # non-overlapping windows; each window's first token is not predicted
    for start in range(0, len(ids), 32):
        window = ids[start : start + 32]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]]))[0].double(), dim=-1)
        for pos, target in enumerate(window[1:]):
            nats -= logp[pos, target].item()
            count += 1
    assert result.tokens == count
    assert result.loss == pytest.approx(nats / count, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nats / count), rel=1e-6)
    n_bytes = len(tokenizer.decode(ids).encode())
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)

    save_hf(model, tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    (tmp_path / "text.txt").write_text(texts[0])
    r = subprocess.run([sys.executable, "-m", "scratchlm", "eval", "--model", str(tmp_path / "m"), "--data",
                        str(tmp_path / "text.txt"), "--split", "all", "--block-size", "32", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"loss", "perplexity", "bits_per_byte", "tokens", "block_size"}
    # By default, the documents a training run on --data holds out: none in one short text.
    r = subprocess.run([sys.executable, "-m", "scratchlm", "eval", "--model", str(tmp_path / "m"), "--data",
                        str(tmp_path / "text.txt"), "--block-size", "32"], capture_output=True, text=True)
    assert r.returncode == 2 and "no held-out documents" in r.stderr and "--split all" in r.stderr


def test_a_block_size_beyond_the_models_context_is_capped_with_a_message(tmp_path, tokenizer, corpus_dir):
    # The README's eval line, on a phi-tiny model (context 512): windows of the model's context, said so.
    torch.manual_seed(0)
    save_hf(Phi(PRESETS["phi-tiny"]), tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    (tmp_path / "text.txt").write_text((corpus_dir / "books" / "pg84_frankenstein.txt").read_text()[:20_000])
    r = subprocess.run([sys.executable, "-m", "scratchlm", "eval", "--model", str(tmp_path / "m"), "--data",
                        str(tmp_path / "text.txt"), "--split", "all", "--block-size", "2048", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "block size 2048 is beyond" in r.stderr and "context of 512" in r.stderr
    assert json.loads(r.stdout)["block_size"] == 512


def test_the_held_out_split_written_out_evaluates_the_same(tmp_path, tokenizer, small_corpus):
    # The README's two eval lines: a corpus's held-out documents (what a run on it holds out), written out
    # as held_out.jsonl, then that file evaluated whole: the same text, the same loss.
    torch.manual_seed(0)
    save_hf(Phi(PRESETS["phi-tiny"]), tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    common = ["--model", str(tmp_path / "m"), "--block-size", "64", "--json"]
    first = subprocess.run([sys.executable, "-m", "scratchlm", "eval", *common, "--data", str(small_corpus),
                            "--eval-fraction", "0.05", "--write-documents", str(tmp_path / "held_out.jsonl")],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    lines = (tmp_path / "held_out.jsonl").read_text().splitlines()
    from scratchlm.data import CorpusReading, held_out_documents

    expected = held_out_documents(small_corpus, CorpusReading(eval_fraction=0.05))
    assert [json.loads(line)["text"] for line in lines] == expected
    again = subprocess.run([sys.executable, "-m", "scratchlm", "eval", *common, "--data",
                            str(tmp_path / "held_out.jsonl"), "--split", "all"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["loss"] == pytest.approx(json.loads(first.stdout)["loss"], rel=1e-6)
