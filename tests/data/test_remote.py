"""The trainer's feed client (data/remote.py) against a real feed that goes away and comes back."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from servers import free_port, spawn, train_command


@pytest.mark.slow
def test_training_survives_three_feed_restarts(small_corpus, tmp_path):
    port = free_port()
    server = spawn(small_corpus, port, "--eval-fraction", "0.05")
    run = tmp_path / "run"
    # 100 steps: more than the three outages take (the trainer waits through each), so all three land mid-run;
    # a shuffle buffer of 4 blocks (260 tokens), so the trainer keeps asking (its default holds the run's
    # 25,600 tokens, fetched before the first step, and the feed's outages would go unnoticed).
    args = train_command(f"http://127.0.0.1:{port}", run, 100, **{"lr-decay-steps": "100",
                                                                    "checkpoint-interval": "1000",
                                                                    "feed-texts-per-request": "1",
                                                                    "feed-shuffle-tokens": "260"})
    trainer = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(trainer.stdout), daemon=True).start()

    def count(text: str) -> int:
        return sum(text in line for line in lines)

    try:
        for restart in range(1, 4):
            deadline = time.monotonic() + 120
            while (count("step ") < 3 or count("waiting for it") < restart - 1
                   or count("is back after") < restart - 1):
                assert trainer.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
                time.sleep(0.1)
            server.kill()
            server.wait()
            while count("waiting for it") < restart:
                assert trainer.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
                time.sleep(0.1)
            server = spawn(small_corpus, port, "--eval-fraction", "0.05")
        trainer.wait(timeout=600)
    finally:
        server.kill()
        trainer.kill()
    assert trainer.returncode == 0, "".join(lines)[-2000:]
    assert count("is back after") == 3
    assert "waiting for it" in (run / "train.log").read_text()  # the outage is in the run's own log too
    assert json.loads((run / "summary.json").read_text())["steps"] == 100
