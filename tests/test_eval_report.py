"""eval, the power-law baseline, the demo and the example notebooks (the report: tests/test_scaling.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.evaluation import evaluate_texts
from scratchlm.model.config import PRESETS
from scratchlm.model.hf import save_hf
from scratchlm.model.model import Phi
from scratchlm.report.backtest import fit_power_law
from scratchlm.report.forecast import extrapolate
from scratchlm.report.law import TOKEN_UNIT

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("E,B,beta", [(3.0, 4.0, 0.35), (2.0, 1.5, 0.6), (4.5, 8.0, 0.2)])
def test_fit_recovers_a_known_power_law(E, B, beta):
    rng = np.random.default_rng(1)
    tokens = np.geomspace(1e5, 1e8, 30)
    losses = E + B * (tokens / TOKEN_UNIT) ** (-beta) + rng.normal(0, 0.005, len(tokens))
    fit = fit_power_law(tokens, losses)
    assert fit.E == pytest.approx(E, abs=0.1)
    assert fit.beta == pytest.approx(beta, rel=0.15)
    target = E + 0.2
    result = extrapolate(tokens, losses, target, samples=50)
    true = TOKEN_UNIT * (B / 0.2) ** (1 / beta)
    assert result["reachable"] and result["tokens"] == pytest.approx(true, rel=0.5)
    lo, hi = result["tokens_90pct_interval"]
    assert lo < result["tokens"] < hi
    assert not extrapolate(tokens, losses, E - 0.5, samples=20)["reachable"]  # below the floor: out of reach


def test_demo_quick_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scratchlm", "demo", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert set(summary["runs"]) == {"clean", "feed", "stream"}
    assert summary["runs"]["clean"]["target_reached"] is not None
    # 30% of the tokens served to the stream run were the teacher's, and of the tokens it trained on about
    # as much (a short run draws few blocks: a wider band); the feed run with no teacher, none.
    assert abs(summary["teacher_token_share_served"] - 0.3) < 0.02
    assert abs(summary["runs"]["stream"]["teacher_token_share"] - 0.3) < 0.1
    assert summary["runs"]["feed"]["teacher_token_share"] == 0.0
    assert set(summary["effects"]) >= {"path", "teacher", "total"}
    assert (tmp_path / "report" / "loss_curves.png").exists() and (tmp_path / "report" / "report.md").exists()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## How much more training" in md and "**Backtest error" in md  # the answer, with its backtest
    assert "## Clean against stream, like with like" in md
    assert "**The path**" in md and "**The teacher**" in md
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7", "target reached"):
        assert stage in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["feed_server.ipynb", "training.ipynb"])
def test_example_notebooks_run_top_to_bottom(notebook, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SCRATCHLM_EXAMPLE_OUT", str(tmp_path))
    nb = nbformat.read(REPO / "examples" / notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs",
                                                                                                  []))
    assert "Traceback" not in outputs
    if notebook == "training.ipynb":
        assert (tmp_path / "notebook" / "final" / "model.safetensors").exists()
        assert "scratchlm report" in outputs
    else:
        assert "replay from the start gives the same first texts: True" in outputs


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


def test_report_skips_damaged_metrics_lines_with_a_warning_each(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "tokens": 0, "eval_loss": 10.8}] + [
        {"step": s, "tokens": 100 * s, "loss": 10 - s / 10, "lr": 1e-3} for s in range(1, 6)] + [
        {"step": 5, "tokens": 500, "eval_loss": 9.0}]
    lines = [json.dumps(r).encode() for r in records]
    lines.insert(3, b'{"step": 3, "lo\xff\xfess": 9.7}')  # a byte that is not UTF-8, in the middle
    lines.insert(4, b'{"step": 3, "loss": 9')  # a record cut short by a crash, then resumed
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b'\n{"step": 6, "lo')  # and a torn last line
    r = subprocess.run([sys.executable, "-m", "scratchlm", "report", str(run), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "is not a JSON record" in line]
    assert len(warnings) == 3 and all("metrics.jsonl line" in w for w in warnings)
    assert [w.split("line ")[1].split()[0] for w in warnings] == ["4", "5", "10"]
    assert (tmp_path / "out" / "report.md").exists()


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
    from scratchlm.data import held_out_documents

    expected = held_out_documents(small_corpus, eval_fraction=0.05)
    assert [json.loads(line)["text"] for line in lines] == expected
    again = subprocess.run([sys.executable, "-m", "scratchlm", "eval", *common, "--data",
                            str(tmp_path / "held_out.jsonl"), "--split", "all"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["loss"] == pytest.approx(json.loads(first.stdout)["loss"], rel=1e-6)
