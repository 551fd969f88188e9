"""Checkpoints and what a run survives: damaged checkpoints and logs, SIGTERM from a preempting scheduler,
random SIGKILLs, a full disk and a bad config file. A run says what is wrong in one line, falls back to what
it can trust, and loses nothing; checkpoints are never unpickled."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import train_command

from scratchlm.training import TrainConfig, train
from scratchlm.training import checkpoint as ckpt

FAST = dict(model="phi-tiny", block_size=64, micro_batch_size=4, eval_batches=1, eval_fraction=0.05,
            warmup_steps=2, lr=3e-3, device="cpu", eval_interval=1000)


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
    proc = subprocess.Popen(train_command(small_corpus, run, 500, **{"checkpoint-interval": "1000"}),
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

    log = (tmp_path / "again.err").open("w")
    again = subprocess.Popen(train_command(small_corpus, tmp_path / "again", 500), stdout=subprocess.DEVNULL,
                             stderr=log)
    # its own time limit: on a busy machine (the demo's test beside it) the first part can use most of its own
    started = time.monotonic()
    while not (tmp_path / "again" / "metrics.jsonl").exists():
        assert again.poll() is None, (tmp_path / "again.err").read_text()[-2000:]
        assert time.monotonic() - started < 240, "the second run wrote no metrics in 240 s"
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

    r = subprocess.run(train_command(small_corpus, tmp_path / "full", 2), capture_output=True, text=True,
                       preexec_fn=full_disk)
    # Which write fails first depends on what is installed (torch writes a temporary file as it is imported
    # when dill is there): either way, one line that says a write failed.
    assert r.returncode == 2 and "cannot write to" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


REPO = Path(__file__).resolve().parents[2]



def train_args(data: Path, out: Path, steps: int, **extra: str) -> list[str]:
    """``train_command`` checkpointing every step (two kept), its rate decaying over the whole run."""
    return train_command(data, out, steps, **{"lr-decay-steps": str(steps), "checkpoint-interval": "1",
                                               "keep-checkpoints": "2", **extra})


@pytest.mark.slow
def test_ten_random_sigkills_then_the_same_final_weights(small_corpus, tmp_path):
    steps = 24
    straight = tmp_path / "straight"
    subprocess.run(train_args(small_corpus, straight, steps), check=True, capture_output=True, timeout=300)
    run = tmp_path / "killed"
    rng = random.Random(8)
    kills = 0
    while kills < 10:
        proc = subprocess.Popen(train_args(small_corpus, run, steps, resume="auto"),
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wait for the run to be under way (a step beyond its last checkpoint), then kill it at a random
        # moment: with a checkpoint every step, about a third of the kills land inside a checkpoint write.
        start = ckpt.latest_checkpoint(run)
        deadline = time.monotonic() + 120
        while ckpt.latest_checkpoint(run) == start and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break  # finished before the kill: the run is complete
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    subprocess.run(train_args(small_corpus, run, steps, resume="auto"), check=True, capture_output=True,
                   timeout=300)
    assert kills == 10
    a = ckpt.load_file(str(straight / "final" / "model.safetensors"))
    b = ckpt.load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if '"loss"' in line]
    assert steps_logged == list(range(1, steps + 1))  # nothing lost, nothing repeated



@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_a_clear_error(small_corpus, tmp_path):
    run = tmp_path / "run"
    subprocess.run(train_args(small_corpus, run, 2, **{"checkpoint-interval": "2"}), check=True,
                   capture_output=True,
                   timeout=300)

    def small_files() -> None:  # a filesystem that refuses files over 20 MB (the weights are 56 MB)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    r = subprocess.run(train_args(small_corpus, run, 4, resume="auto", **{"checkpoint-interval": "2"}),
                       capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not write checkpoint step 4" in r.stderr and "step-00000002) is intact" in r.stderr
    assert "Traceback" not in r.stderr
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step-00000002"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    state = ckpt.load_checkpoint(run / "checkpoints" / "step-00000002",
                                 __import__("scratchlm.model.model", fromlist=["Phi"]).Phi(
                                     __import__("scratchlm.model.config",
                                                fromlist=["PRESETS"]).PRESETS["phi-tiny"]),
                                 None)
    assert state["step"] == 2



@pytest.mark.slow
def test_checkpoints_are_never_unpickled():
    # Weights and optimizer state are safetensors; no module calls torch.load (which unpickles) at all.
    import re

    sources = "\n".join(p.read_text() for p in (REPO / "src" / "scratchlm").rglob("*.py"))
    assert not re.search(r"torch\.load\(|^\s*(import|from) pickle|pickle\.loads?\(", sources, re.MULTILINE)
