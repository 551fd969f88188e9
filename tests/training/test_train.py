"""The trainer on the real tokenizer and real corpus text, on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import PhiForCausalLM

from scratchlm import faults
from scratchlm.config import ConfigError
from scratchlm.data import DataError
from scratchlm.model.config import PRESETS
from scratchlm.model.hf import load_hf
from scratchlm.model.model import Phi
from scratchlm.training import NonFiniteLoss, TrainConfig, train
from scratchlm.training import checkpoint as ckpt

FAST = dict(model="phi-tiny", block_size=64, micro_batch_size=4, eval_batches=2, eval_fraction=0.05,
            warmup_steps=5, lr=3e-3, min_lr=3e-4, device="cpu")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_reaches_initial_loss_minus_one_and_writes_final(small_corpus, tmp_path):
    run = tmp_path / "run"
    summary = train(TrainConfig(**FAST, data=str(small_corpus), out=str(run), target_loss="auto",
                                max_steps=200,
                                eval_interval=5, log_interval=5))
    assert summary["reason"] == "target loss reached"
    reached = summary["target_reached"]
    assert reached["eval_loss"] <= summary["initial_eval_loss"] - 1 + 1e-9
    assert abs(summary["initial_eval_loss"] - math.log(50295)) < 0.5

    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in steps), key
    assert steps[-1]["tokens"] == summary["steps"] * 4 * 64
    assert any(r.get("event") == "target_reached" and r["step"] == reached["step"] for r in records)
    assert sum("eval_loss" in r for r in records) >= 2

    log_text = (run / "train.log").read_text()
    assert "target reached" in log_text and "tok/s" in log_text and "data wait" in log_text
    model, info = PhiForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    assert not any(info.values())
    assert (run / "final" / "tokenizer.json").exists()


def test_a_block_longer_than_the_presets_context_widens_it(small_corpus, tmp_path):
    """phi-tiny holds 512 positions; a run at 600 trains at 600 (rotary: no position is learned), and its
    export says so: transformers reads it back and agrees with our model at the positions beyond 512."""
    run = tmp_path / "run"
    train(TrainConfig(**{**FAST, "block_size": 600, "micro_batch_size": 1}, data=str(small_corpus),
                      out=str(run), max_steps=2, eval_interval=100))
    theirs = PhiForCausalLM.from_pretrained(run / "final").eval()
    assert theirs.config.max_position_embeddings == 600 == PRESETS["phi-tiny"].block_size + 88
    ids = torch.randint(0, 50_000, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        ours = load_hf(str(run / "final"))(ids)
    torch.testing.assert_close(ours[:, 512:, : expected.shape[-1]], expected[:, 512:], atol=1e-4, rtol=1e-4)


def test_a_decay_branched_off_a_checkpoint_is_the_wsd_run_of_that_length(small_corpus, tmp_path):
    """--resume-from CKPT --decay-steps N: a constant run branched at step 8 and decayed over 4 steps trains
    exactly what a 12-step wsd run with a 4-step decay trains, and carries the parent's history."""
    common = dict(FAST, data=str(small_corpus), eval_interval=4, checkpoint_interval=4)
    constant, branch, wsd = tmp_path / "constant", tmp_path / "branch", tmp_path / "wsd"
    train(TrainConfig(**common, out=str(constant), max_steps=12, lr_schedule="constant"))
    summary = train(TrainConfig(**common, out=str(branch), lr_schedule="wsd", decay_steps=4,
                                resume_from=str(constant / "checkpoints" / "step-00000008")))
    train(TrainConfig(**common, out=str(wsd), max_steps=12, lr_schedule="wsd", decay_steps=4))

    assert summary["steps"] == 12 and summary["branch"]["step"] == 8
    rates = {r["step"]: r["lr"] for r in read_metrics(branch) if "loss" in r}
    assert sorted(rates) == list(range(1, 13))
    # the rate of step k is logged with step k; the decay starts at the parent's rate and falls each step
    assert rates[9] == pytest.approx(3e-3) and 3e-4 < rates[12] < rates[11] < rates[10] < 3e-3
    assert (summary["lr_schedule"]["decay_start"], summary["lr_schedule"]["decay_end"]) == (8, 12)
    parent = read_metrics(constant)
    assert [r for r in read_metrics(branch) if r["step"] <= 8] == [r for r in parent if r["step"] <= 8]
    a, b = step_losses(branch), step_losses(wsd)
    assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in range(1, 13))
    assert summary["final_eval_loss"] == pytest.approx(json.loads((wsd / "summary.json").read_text())[
        "final_eval_loss"], abs=1e-6)
    with pytest.raises(ConfigError, match="--decay-steps"):
        TrainConfig(**common, out=str(tmp_path / "x"), max_steps=5, decay_steps=2).check()
    with pytest.raises(ConfigError, match="--resume-from .*not a checkpoint folder"):
        train(TrainConfig(**common, out=str(tmp_path / "y"), decay_steps=2, resume_from=str(constant)))
    assert not (tmp_path / "y" / "checkpoints").exists()


def test_resume_continues_exactly(small_corpus, tmp_path):
    common = dict(FAST, data=str(small_corpus), lr_decay_steps=20, eval_interval=100, checkpoint_interval=5)
    straight = tmp_path / "straight"
    train(TrainConfig(**common, out=str(straight), max_steps=20))
    resumed = tmp_path / "resumed"
    train(TrainConfig(**common, out=str(resumed), max_steps=10))
    train(TrainConfig(**common, out=str(resumed), max_steps=20, resume="auto"))

    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(b) == list(range(1, 21))  # every step once: nothing repeated, nothing skipped
    for step in range(1, 21):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    w_a = ckpt.load_file(str(ckpt.latest_checkpoint(straight) / "model.safetensors"))
    w_b = ckpt.load_file(str(ckpt.latest_checkpoint(resumed) / "model.safetensors"))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=0, atol=1e-6)
    assert len(ckpt.checkpoint_dirs(straight)) == 2  # keep_checkpoints
    saves = [line for line in (straight / "train.log").read_text().splitlines() if "checkpoint saved" in line]
    assert len(saves) == 4  # steps 5, 10, 15, 20: the final step's checkpoint is written once


def test_refuses_to_overwrite_a_run_without_resume(small_corpus, tmp_path):
    cfg = dict(FAST, data=str(small_corpus), out=str(tmp_path / "r"), max_steps=2, eval_interval=100)
    train(TrainConfig(**cfg))
    with pytest.raises(ConfigError, match="--resume auto"):
        train(TrainConfig(**cfg))


def test_kill_during_checkpoint_write_keeps_previous(small_corpus, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, faults.ENV: "checkpoint@6=60"}
    args = [sys.executable, "-m", "scratchlm", "train", "--model", "phi-tiny", "--data", str(small_corpus),
            "--out", str(run), "--block-size", "64", "--micro-batch-size", "4", "--eval-batches", "1",
            "--eval-fraction", "0.05", "--max-steps", "50", "--checkpoint-interval", "3", "--eval-interval",
            "100",
            "--device", "cpu"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = run / "checkpoints" / "step-00000006.tmp"
    deadline = time.monotonic() + 120
    while not (partial / "model.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "trainer ended before the write"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert ckpt.latest_checkpoint(run).name == "step-00000003"
    model = Phi(PRESETS["phi-tiny"])
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run), model, None)
    assert state["step"] == 3

    summary = train(TrainConfig(**FAST, data=str(small_corpus), out=str(run), max_steps=8, eval_interval=100,
                                checkpoint_interval=3, resume="auto"))
    assert summary["steps"] == 8
    assert not partial.exists()
    assert sorted(step_losses(run)) == list(range(1, 9))


def test_nonfinite_loss_stops_with_message_and_intact_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="last checkpoint is intact"):
        train(TrainConfig(**dict(FAST, lr=1e12, warmup_steps=1), grad_clip=0.0, data=str(small_corpus),
                          out=str(run), max_steps=50, checkpoint_interval=1, eval_interval=100))
    last = ckpt.latest_checkpoint(run)
    assert last is not None
    state = ckpt.load_checkpoint(last, Phi(PRESETS["phi-tiny"]), None)
    assert state["step"] >= 1


def test_empty_corpus_and_unknown_model_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    r = subprocess.run([sys.executable, "-m", "scratchlm", "train", "--data", str(empty), "--out",
                        str(tmp_path / "r"), "--max-steps", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "no usable text" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "scratchlm", "train", "--model", "phi-99", "--out",
                        str(tmp_path / "r2"), "--max-steps", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model 'phi-99'" in r.stderr and "Traceback" not in r.stderr


def test_weighted_mix_of_two_corpora_logs_per_source_losses_and_resumes_exactly(small_corpus, corpus_dir,
                                                                                tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "python_click.txt").write_bytes((corpus_dir / "code" / "python_click.txt").read_bytes())
    data = f"{small_corpus}:3,{code}:1"
    common = dict(FAST, data=data, lr_decay_steps=12, eval_interval=6, checkpoint_interval=6)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(TrainConfig(**common, out=str(straight), max_steps=12))
    train(TrainConfig(**common, out=str(resumed), max_steps=6))
    train(TrainConfig(**common, out=str(resumed), max_steps=12, resume="auto"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    evals = [r for r in read_metrics(straight) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in evals:
        by_source = r["eval_loss_by_source"]
        assert set(by_source) == {small_corpus.name, "code"}
        # 2 micro-batches of 4 = 8 evaluation blocks: 6 from the books, 2 from the code, so a weighted mean.
        assert abs((6 * by_source[small_corpus.name] + 2 * by_source["code"]) / 8 - r["eval_loss"]) < 1e-6
    log_text = (straight / "train.log").read_text()
    assert "at 75.0% of training blocks" in log_text and "at 25.0% of training blocks" in log_text
    with pytest.raises(DataError, match="same --data list"):  # the data position belongs to the mix
        train(TrainConfig(**{**common, "data": str(small_corpus)}, out=str(resumed), max_steps=14,
                          resume="auto"))
    from scratchlm.reporting.command import ReportRequest, build_report

    build_report(ReportRequest([straight], tmp_path / "report"))
    curves = json.loads((tmp_path / "report" / "loss_curves.json").read_text())["straight"]["eval"]
    assert curves["loss[code]"] == [r["eval_loss_by_source"]["code"] for r in evals]  # plotted per source too


def test_a_mix_with_a_source_too_small_to_evaluate_names_it(small_corpus, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Only a line of text, far less than a block.\n")
    with pytest.raises(DataError, match="tiny.txt"):
        train(TrainConfig(**FAST, data=f"{small_corpus}:1,{tiny}:1", out=str(tmp_path / "run"), max_steps=1))


def test_fp16_skips_overflowing_steps_counts_them_and_resumes_with_its_loss_scale(small_corpus, tmp_path):
    # The scaler runs on the CPU too. A loss scale of 2^20 overflows float16 at once: the first steps are
    # skipped (counted, logged) while the scale halves, then training goes on; a resume keeps the scale.
    common = dict(FAST, data=str(small_corpus), block_size=16, micro_batch_size=2, lr_decay_steps=8,
                  eval_interval=100, eval_batches=1, checkpoint_interval=4, precision="fp16",
                  loss_scale=2.0**20)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = train(TrainConfig(**common, out=str(straight), max_steps=8))
    train(TrainConfig(**common, out=str(resumed), max_steps=4))
    saved = json.loads((resumed / "checkpoints" / "step-00000004" / "state.json").read_text())
    train(TrainConfig(**common, out=str(resumed), max_steps=8, resume="auto"))
    overflows = [r for r in read_metrics(straight) if r.get("event") == "fp16_overflow"]
    assert summary["overflow_steps"] == len(overflows) >= 3
    assert overflows[-1]["loss_scale"] < 2.0**20 and saved["loss_scaler"]["scale"] < 2.0**20
    assert "gradients overflowed in fp16" in (straight / "train.log").read_text()
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
