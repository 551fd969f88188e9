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
    # One plain and one compiled training row per preset; on the CPU both presets are phi-tiny, run once.
    assert table.count("train phi-tiny") == 2 and table.count("compiled") == 1
    assert "gen phi-tiny b4" in table and "target reached" in table and "fsdp ws1" in table
    assert "T=0.8 top-p=0.95" in table  # the teacher's sampled generation, not greedy alone
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
