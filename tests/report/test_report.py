"""The report's reading of runs and its plain power-law baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from scratchlm.reporting.backtest import fit_power_law
from scratchlm.reporting.law import TOKEN_UNIT


@pytest.mark.parametrize("E,B,beta", [(3.0, 4.0, 0.35), (2.0, 1.5, 0.6), (4.5, 8.0, 0.2)])
def test_fit_recovers_a_known_power_law(E, B, beta):
    rng = np.random.default_rng(1)
    tokens = np.geomspace(1e5, 1e8, 30)
    losses = E + B * (tokens / TOKEN_UNIT) ** (-beta) + rng.normal(0, 0.005, len(tokens))
    fit = fit_power_law(tokens, losses)
    assert fit.E == pytest.approx(E, abs=0.1)
    assert fit.beta == pytest.approx(beta, rel=0.15)
    true = TOKEN_UNIT * (B / 0.2) ** (1 / beta)
    assert fit.tokens_to_reach(E + 0.2) == pytest.approx(true, rel=0.5)
    assert fit.tokens_to_reach(E - 0.5) is None  # below the floor: out of reach



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
