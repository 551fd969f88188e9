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
    # answers that respect physics and size: phi-tiny's floor from the packaged ladder; no token count to a
    # loss under it, and nothing drawn below it (nor below zero)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for outlook in report["forecasts"].values():
        floor, reach = outlook["floor"], outlook["reference"]
        if floor is None:  # the ladder saw no floor: no count to a loss this size is not shown to reach
            assert reach["floor_unmeasured"] and reach["tokens"] is None and "**no token count**" in md
            assert reach["ladder"].startswith("the ladder of bench/ladder.py")
        else:
            assert outlook["floor_from"].startswith("the ladder of bench/ladder.py")
            assert reach["tokens"] is None or floor < reach["loss"]  # a count only to a loss over the floor
        drawn = json.loads((tmp_path / "report" / outlook["plot"]).with_suffix(".json").read_text())
        lines = [drawn["ends"][k] for k in ("loss", "low", "high")]
        lines += [r["law"] for r in drawn["runs"].values()]
        assert min(min(line) for line in lines) >= (floor or 0.0) >= 0



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
