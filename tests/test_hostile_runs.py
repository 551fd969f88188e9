"""Damaged checkpoints and logs, a preempting scheduler, a bad config file and a full disk (issue 13's list):
a training run says what is wrong in one line, falls back to what it can trust, and loses nothing on
SIGTERM."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchlm.train import TrainConfig, train
from scratchlm.train import checkpoint as ckpt

FAST = dict(model="phi-tiny", block_size=64, micro_batch_size=4, eval_batches=1, eval_fraction=0.05,
            warmup_steps=2, lr=3e-3, device="cpu", eval_interval=1000)


def args(data: Path, out: Path, steps: int, **extra: str) -> list[str]:
    settings = {"model": "phi-tiny", "data": str(data), "out": str(out), "block-size": "64",
                "micro-batch-size": "4", "eval-batches": "1", "eval-fraction": "0.05",
                "max-steps": str(steps),
                "eval-interval": "1000", "device": "cpu", **extra}
    return [sys.executable, "-m", "scratchlm", "train",
            *[x for k, v in settings.items() for x in (f"--{k}", v)]]


@pytest.fixture(scope="module")
def two_checkpoints(small_corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    train(TrainConfig(**FAST, data=str(small_corpus), out=str(run), max_steps=4, checkpoint_interval=2,
                      keep_checkpoints=3))
    return run


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    "truncated weights": lambda d: cut(d / "model.safetensors", 999),
    "empty weights": lambda d: (d / "model.safetensors").write_bytes(b""),
    "half the weights": lambda d: cut(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
    "truncated RNG": lambda d: cut(d / "rng.safetensors", 40),
    "empty state": lambda d: (d / "state.json").write_text(""),
    "state not JSON": lambda d: (d / "state.json").write_text("{step: 4"),
    "optimizer deleted": lambda d: (d / "optimizer.safetensors").unlink(),
    "optimizer.json a list": lambda d: (d / "optimizer.json").write_text("[]"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_fails_verification(two_checkpoints, tmp_path, damage):
    copy = tmp_path / "step"
    shutil.copytree(two_checkpoints / "checkpoints" / "step-00000004", copy)
    assert ckpt.verify(copy) is None
    DAMAGE[damage](copy)
    assert ckpt.verify(copy) is not None


def test_resume_falls_back_past_a_damaged_checkpoint_and_a_torn_log_line(two_checkpoints, small_corpus,
                                                                          tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    DAMAGE["half the weights"](run / "checkpoints" / "step-00000004")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 9.1, "lr"')  # the process died in the middle of this line
    summary = train(TrainConfig(**FAST, data=str(small_corpus), out=str(run), max_steps=6,
                                checkpoint_interval=2,
                                resume="auto"))
    log = (run / "train.log").read_text()
    assert "skipping checkpoint step-00000004: model.safetensors differs from its manifest" in log
    assert "resumed from" in log and "step-00000002: step 2" in log
    assert summary["steps"] == 6
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 and 4 trained again from step 2; the torn line is gone


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_75(small_corpus, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(args(small_corpus, run, 500, **{"checkpoint-interval": "1000"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text().count('"loss"') < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "--resume auto" in err and "Traceback" not in err
    newest = ckpt.latest_checkpoint(run)
    saved = json.loads((newest / "state.json").read_text())["step"]
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert saved >= 3 and logged == list(range(1, saved + 1))  # every step trained is in the checkpoint
    assert "SIGTERM received" in (run / "train.log").read_text()

    again = subprocess.Popen(args(small_corpus, tmp_path / "again", 500), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    while not (tmp_path / "again" / "metrics.jsonl").exists():
        assert again.poll() is None and time.monotonic() < deadline + 120
        time.sleep(0.05)
    again.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    again.send_signal(signal.SIGTERM)  # a second signal: at once
    assert again.wait(timeout=30) == -signal.SIGTERM


def test_a_config_that_is_not_utf8_and_a_full_disk_are_one_clear_line(small_corpus, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes("lr: 0.001  # café\n".encode("latin-1"))
    r = subprocess.run([sys.executable, "-m", "scratchlm", "train", "--config", str(bad), "--out",
                        str(tmp_path / "r"), "--max-steps", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "is not UTF-8 text" in r.stderr and "Traceback" not in r.stderr

    def full_disk() -> None:  # no file may grow: what a full disk looks like to the writer
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    r = subprocess.run(args(small_corpus, tmp_path / "full", 2), capture_output=True, text=True,
                       preexec_fn=full_disk)
    # Which write fails first depends on what is installed (torch writes a temporary file as it is imported
    # when dill is there): either way, one line that says a write failed.
    assert r.returncode == 2 and "cannot write to" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
