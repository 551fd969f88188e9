"""The demo and the example notebooks, end to end at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scratchlm", "demo", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    runs = summary["runs"]
    assert {name: run["kind"] for name, run in runs.items()} == {
        "clean": "corpus", "feed": "feed", "stream": "stream", "knowledge": "knowledge", "teacher": "teacher"}
    assert runs["clean"]["target_reached"] is not None
    # The teacher knows more than its students: three times their steps (clean is a branch of its run).
    assert runs["teacher"]["tokens"] == 3 * runs["clean"]["tokens"]
    evals = summary["held_out_eval"]
    assert evals["teacher"]["loss"] < min(evals[n]["loss"] for n in ("clean", "feed", "stream", "knowledge"))
    # 30% of the stream run's tokens were the teacher's (a short run draws few blocks: a wide band); the feed
    # and knowledge runs read the corpus alone, the latter with the teacher's scores at every token.
    assert abs(runs["stream"]["teacher_token_share"] - 0.3) < 0.1
    assert runs["feed"]["teacher_token_share"] == runs["knowledge"]["teacher_token_share"] == 0.0
    assert set(summary["answers"]) >= {"path", "text", "knowledge", "total"}
    assert summary["teacher_seconds"]["stream"] > 0 and summary["teacher_seconds"]["knowledge"] > 0
    # Each run against its control: tokens and wall time to the control's loss, the teacher's seconds apart.
    table = summary["comparisons"]["runs"]
    assert {n: r["control"] for n, r in table.items()} == {
        "clean": None, "feed": "clean", "stream": "feed", "knowledge": "feed", "teacher": None}
    assert table["knowledge"]["teacher_seconds"] == summary["teacher_seconds"]["knowledge"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## What the teacher buys: each run against its control" in md and "teacher's seconds" in md
    for answer in ("**The path**", "**The teacher's text**", "**The teacher's knowledge**", "seed spread"):
        assert answer in md
    png = (tmp_path / "report" / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "report" / "loss_curves.json").exists()
    assert "## How much more training" in md and "**Backtest error" in md  # the answer, with its backtest
    assert md.count("## How much more training") == 1  # once: the others a line each
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7", "target reached"):
        assert stage in r.stdout
    # answers that respect physics and size: phi-tiny's floor from the packaged ladder; no token count to a
    # loss under it, and nothing drawn below it (nor below zero); the plot draws the curve the text answers
    # from, and its band never rises above the last evaluation
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    outlook = next(iter(report["forecasts"].values()))
    floor, reach = outlook["floor"], outlook["reference"]
    if floor is None:  # the ladder saw no floor: no count to a loss this size is not shown to reach
        assert reach["floor_unmeasured"] and reach["tokens"] is None and "**no token count**" in md
    else:
        assert outlook["floor_from"].startswith("the ladder of bench/ladder.py")
        assert reach["tokens"] is None or floor < reach["loss"]  # a count only to a loss over the floor
    drawn = json.loads((tmp_path / "report" / "forecast.json").read_text())
    ends = drawn["ends"]
    assert drawn["ends"]["law"] == reach["law"] == outlook["answer_law"]["from"]
    lines = [ends[k] for k in ("loss", "low", "high")] + [r["law"] for r in drawn["runs"].values()]
    assert min(min(line) for line in lines) >= (floor or 0.0) >= 0
    assert max(ends["high"]) <= outlook["last_eval"]["loss"] + 1e-9
    assert all(b <= a + 1e-12 for a, b in zip(ends["high"], ends["high"][1:], strict=False))  # never rises
    if reach["tokens"]:  # the drawn curve crosses the reference where the text says, to the plot's grid
        crossing = next(t for t, loss in zip(ends["tokens"], ends["loss"], strict=True)
                        if loss <= reach["loss"])
        step, said = ends["tokens"][1] / ends["tokens"][0], reach["tokens"]
        assert said / step <= crossing <= said * step * step, (crossing, said)


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
