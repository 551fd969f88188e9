"""Data parallelism on the CPU: torchrun, gloo, 2 processes, the real trainer, tokenizer and corpus text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port

pytestmark = pytest.mark.slow


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads,
                                   (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def book(corpus_dir, tmp_path_factory) -> Path:
    return corpus_dir / "books" / "pg11_alices_adventures_in_wonderland.txt"


def common(book: Path, steps: int, **extra) -> list[str]:
    args = {"model": "phi-tiny", "data": str(book), "block-size": "64", "eval-batches": "1",
            "eval-fraction": "0.05",
            "max-steps": str(steps), "eval-interval": "100", "checkpoint-interval": "4", "device": "cpu",
            "lr": "1e-3", "warmup-steps": "2", "lr-decay-steps": "8", **extra}
    return [x for k, v in args.items() for x in (f"--{k}", v)]


def run(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "scratchlm", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "scratchlm", "train", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\nstderr: {r.stderr[-4000:]}\nstdout: {r.stdout[-1000:]}"
    return r


@pytest.fixture(scope="module")
def single(book, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    run(1, common(book, 5, out=str(out), **{"micro-batch-size": "8"}))
    return losses(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(strategy, single, book, tmp_path):
    # FSDP2 runs on CPU with gloo in this PyTorch, so it is checked here rather than only on a GPU.
    r = run(2, common(book, 5, out=str(tmp_path), strategy=strategy, **{"micro-batch-size": "4"}))
    two = losses(tmp_path)
    assert len(two) == len(single) == 5
    assert max(abs(a - b) for a, b in zip(single, two, strict=True)) <= 1e-5, (single, two)
    assert f"{strategy} over 2 processes" in (tmp_path / "train.log").read_text()
    assert r.stdout.count('"reason"') == 1  # rank 0 alone reports
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "loss" in m)
    assert step["tokens"] == 2 * 4 * 64
    assert step["tokens_per_s_per_device"] == pytest.approx(step["tokens_per_s"] / 2)
    from transformers import PhiForCausalLM

    _, info = PhiForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not any(info.values())


def test_two_process_run_resumes_exactly(book, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(2, common(book, 8, out=str(straight), strategy="ddp", **{"micro-batch-size": "4"}))
    run(2, common(book, 4, out=str(resumed), strategy="ddp", **{"micro-batch-size": "4"}))
    run(2, common(book, 8, out=str(resumed), strategy="ddp", resume="auto", **{"micro-batch-size": "4"}))
    a, b = losses(straight), losses(resumed)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6, (a, b)
    state = json.loads(sorted((resumed / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert len(state["data_positions"]) == 2
