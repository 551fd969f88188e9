"""bench/gpu_check.sh in its CPU smoke mode: the script a GPU session runs must work before it gets there."""

import os
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_smoke(tmp_path):
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OUT": str(tmp_path)},
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "gpu_check_table.txt").read_text()
    assert "FAILED" not in table, table
    # each step's row: compiled training and the distilled step, FSDP's resume, the fp32 soft-label run on the
    # CPU, the target, the teacher's generation (sampled, not greedy alone), its logprobs and its scoring
    for row in ("train phi-tiny 2x64 fp32 compiled", "distill step phi-tiny", "fsdp ws1: resumed from",
                "distilled fp32 run", "target reached", "gen phi-tiny b4", "T=0.8 top-p=0.95",
                "with logprobs 20", "score phi-tiny 4x64"):
        assert row in table, (row, table)
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
