"""``--wandb PROJECT/RUN``: a run and its resumption, typed as the README types them, mirrored to one W&B run.

W&B's offline mode (``WANDB_MODE=offline``) stands in for its servers, which cannot be reached here: it writes
the run as a local ``.wandb`` file (what ``wandb sync`` uploads), and this test reads the records back.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed record fragments
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_file(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pending, pos = [], b"", 7  # a 7-byte file header: magic, version
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a fragment header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(items) -> dict:
    """A history row or config as a dict (a key is either ``key`` or a ``nested_key`` path)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_a_run_and_its_resumption_mirror_every_metrics_record_to_one_wandb_run(corpus_dir, tmp_path):
    data = tmp_path / "two-books"
    data.mkdir()
    for name in ("pg11_alices_adventures_in_wonderland.txt", "pg84_frankenstein.txt"):
        shutil.copyfile(corpus_dir / "books" / name, data / name)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "scratchlm", "train", "--data", str(data), "--model", "phi-tiny",
               "--block-size", "64", "--micro-batch-size", "2", "--eval-interval", "2", "--eval-batches", "1",
               "--eval-fraction", "0.5", "--checkpoint-interval", "2", "--device", "cpu", "--out", str(out),
               "--wandb", "scratchlm-tests/toy"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([*command, "--max-steps", "3"], env=env, check=True, capture_output=True)
    subprocess.run([*command, "--max-steps", "5", "--resume", "auto"], env=env, check=True,
                   capture_output=True)

    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the first run and its resumption: one W&B run id, no second tracked run
    history, runs = [], []
    for path in files:
        for record in read_wandb_file(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = _items(record.history.item)
                history.append({k: v for k, v in row.items() if not k.startswith("_")})  # W&B's own fields
            elif kind == "run":
                runs.append(record.run)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history == metrics and [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5]
    assert {(r.run_id, r.project, r.display_name) for r in runs} == {(run_id, "scratchlm-tests", "toy")}
    config = _items(runs[-1].config.update)
    assert config["model"] == "phi-tiny" and config["max_steps"] == 5 and config["block_size"] == 64


def test_wandb_writes_where_wandb_dir_says(corpus_dir, tmp_path):
    """A cluster user's WANDB_DIR wins over the run folder (W&B's offline mode, as above)."""
    data = tmp_path / "book"
    data.mkdir()
    shutil.copyfile(corpus_dir / "books" / "pg11_alices_adventures_in_wonderland.txt", data / "alice.txt")
    out, elsewhere = tmp_path / "run", tmp_path / "scratch"
    elsewhere.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(elsewhere)}
    subprocess.run([sys.executable, "-m", "scratchlm", "train", "--data", str(data), "--model", "phi-tiny",
                    "--block-size", "64", "--micro-batch-size", "2", "--eval-interval", "2",
                    "--eval-batches", "1", "--eval-fraction", "0.5", "--device", "cpu", "--out", str(out),
                    "--max-steps", "2",
                    "--wandb", "scratchlm-tests/elsewhere"], env=env, check=True, capture_output=True)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert list((elsewhere / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert not (out / "wandb").exists()
