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
def distill(book, tmp_path_factory, tokenizer) -> dict[str, str]:
    """The flags of a run distilled from ``book``'s soft labels, prepared as a user prepares them (a one-layer
    teacher: quick to score with). They name their teacher: the session's shared token cache may hold another
    teacher's labels for the same book (bench/gpu_check.sh's), which a run must not choose between."""
    import torch

    from scratchlm.model.config import ModelConfig
    from scratchlm.model.hf import save_hf
    from scratchlm.model.model import Phi

    teacher = tmp_path_factory.mktemp("teacher") / "small"
    torch.manual_seed(0)
    save_hf(Phi(ModelConfig(name="small", n_layer=1, n_embd=64, n_head=2, intermediate_size=128,
                            block_size=128)), teacher)
    tokenizer.save(teacher)
    r = subprocess.run([sys.executable, "-m", "scratchlm", "prepare", "--data", str(book), "--eval-fraction",
                        "0.05", "--teacher", f"local:{teacher}", "--soft-labels", "5", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"soft-labels": "5", "distill-weight": "0.5", "soft-label-teacher": f"local:{teacher}"}


@pytest.fixture(scope="module")
def single(book, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    run(1, common(book, 5, out=str(out), **{"micro-batch-size": "8"}))
    return losses(out)


@pytest.fixture(scope="module")
def single_distilled(book, distill, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single-distilled")
    run(1, common(book, 5, out=str(out), **{"micro-batch-size": "8"}, **distill))
    return losses(out)


@pytest.mark.parametrize("strategy,distilled", [("ddp", False), ("fsdp", True)],
                         ids=["ddp", "fsdp, distilling"])
def test_two_processes_match_one_with_the_same_global_batch(strategy, distilled, request, book, tmp_path):
    # FSDP2 runs on CPU with gloo in this PyTorch, so it is checked here rather than only on a GPU.
    single = request.getfixturevalue("single_distilled" if distilled else "single")
    # DDP accumulating gradients (reduced once a step: test_parallel_sync.py): the same global batch.
    extra = request.getfixturevalue("distill") if distilled else {"grad-accum-steps": "2"}
    micro = "4" if distilled else "2"
    r = run(2, common(book, 5, out=str(tmp_path), strategy=strategy, **{"micro-batch-size": micro}, **extra))
    two = losses(tmp_path)
    assert len(two) == len(single) == 5
    assert max(abs(a - b) for a, b in zip(single, two, strict=True)) <= 1e-5, (single, two)
    assert f"{strategy} over 2 processes" in (tmp_path / "train.log").read_text()
    assert r.stdout.count('"reason"') == 1  # rank 0 alone reports
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "loss" in m)
    assert step["tokens"] == 8 * 64
    assert step["tokens_per_s_per_device"] == pytest.approx(step["tokens_per_s"] / 2)
    from transformers import PhiForCausalLM

    _, info = PhiForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not any(info.values())


def test_two_process_distilled_run_from_prepared_soft_labels_resumes_exactly(book, distill, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = {"micro-batch-size": "4", **distill}
    run(2, common(book, 8, out=str(straight), strategy="ddp", **flags))
    run(2, common(book, 4, out=str(resumed), strategy="ddp", **flags))
    run(2, common(book, 8, out=str(resumed), strategy="ddp", resume="auto", **flags))
    a, b = losses(straight), losses(resumed)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6, (a, b)
    kd = [json.loads(line).get("kd_loss") for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(v > 0 for v in kd if v is not None) and sum(v is not None for v in kd) == 8
    state = json.loads(sorted((resumed / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert len(state["data_positions"]) == 2
