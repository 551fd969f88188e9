"""Faults, bad inputs and load (issue 8): what survives what. CPU, loopback only, bounded in time."""

from __future__ import annotations

import json
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from servers import UvicornThread, spawn

from scratchlm.data import CorpusStats, iter_documents
from scratchlm.data.remote import FeedClient
from scratchlm.feed.server import ServeConfig, build
from scratchlm.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def train_args(data: Path, out: Path, steps: int, **extra: str) -> list[str]:
    args = {"model": "phi-tiny", "data": str(data), "out": str(out), "block-size": "64",
            "micro-batch-size": "4",
            "eval-batches": "1", "eval-fraction": "0.05", "max-steps": str(steps),
            "lr-decay-steps": str(steps),
            "eval-interval": "1000", "checkpoint-interval": "1", "keep-checkpoints": "2", "device": "cpu",
            **extra}
    return [sys.executable, "-m", "scratchlm", "train", *[x for k, v in args.items() for x in (f"--{k}", v)]]


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


def test_training_survives_three_feed_restarts(small_corpus, tmp_path):
    from servers import free_port

    port = free_port()
    server = spawn(small_corpus, port, "--eval-fraction", "0.05")
    run = tmp_path / "run"
    # 100 steps: more than the three outages take (the trainer waits through each), so all three land mid-run.
    args = train_args(f"http://127.0.0.1:{port}", run, 100, **{"checkpoint-interval": "1000",
                                                                 "feed-texts-per-request": "1"})
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


def test_a_hung_teacher_is_reported_down_and_the_feed_keeps_serving(small_corpus):
    release = threading.Event()

    def produce(n: int) -> list[str]:
        if not release.is_set():
            release.wait(60)  # hangs until released
        return [f"teacher text {i} {time.time_ns()}" for i in range(n)]

    cfg = ServeConfig(corpus=str(small_corpus), teacher_ratio=0.5, teacher_mode="best-effort",
                      teacher_deadline_s=0.05, teacher_stall_s=0.5)
    app, feed = build(cfg, teacher=produce)
    with UvicornThread(app) as s:
        time.sleep(0.8)
        t0 = time.monotonic()
        reply = FeedClient(s.url).batch(10, None)
        assert len(reply.texts) == 10 and set(reply.sources) == {"corpus"} and time.monotonic() - t0 < 2
        assert httpx.get(s.url + "/health").json()["teacher"] == "down"
        assert "scratchlm_teacher_up 0.0" in httpx.get(s.url + "/metrics").text
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["teacher"] != "up":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert "teacher" in FeedClient(s.url).batch(20, None).sources
    feed.teachers.stop()


def test_schemathesis_finds_no_server_error(small_corpus):
    # Property-based requests generated from the server's own OpenAPI schema: whatever they hold, no 5xx.
    app, _ = build(ServeConfig(corpus=str(small_corpus), max_batch_size=64))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/v1/batch", "/v1/heldout", "/health", "/metrics"}
    for operation in operations:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(checks=[not_a_server_error])

        check()


def test_hostile_requests_get_4xx_not_5xx(small_corpus, tmp_path):
    key = tmp_path / "key"
    key.write_text("k")
    with UvicornThread(build(ServeConfig(corpus=str(small_corpus), api_key_file=str(key)))[0]) as s:
        auth = {"Authorization": "Bearer k"}
        for query in ["size=-1", "size=1e309", "size=%00", "cursor=v1-" + "9" * 150, "cursor=%FF%FE",
                      "rank=99999999999999999999", "world_size=0", "size=2&size=3", "cursor=v1-x-y-z"]:
            r = httpx.get(f"{s.url}/v1/batch?{query}", headers=auth)
            assert 400 <= r.status_code < 500 or r.status_code == 200, (query, r.status_code)
            assert r.status_code < 500
        for headers in [{"Authorization": "Bearer " + "k" * 10000}, {"Authorization": "Basic k"},
                        {"Authorization": "Bearer k\u00e9".encode()}, {"X-Junk": "\x7f" * 100}]:
            r = httpx.get(s.url + "/v1/batch", headers=headers)
            assert r.status_code in (400, 401, 431), (headers.keys(), r.status_code)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as raw:  # not HTTP at all
            raw.sendall(b"\x16\x03\x01garbage\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 400")
        assert httpx.get(s.url + "/health").status_code == 200  # still serving


def test_hostile_corpora(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "huge_line.txt").write_text("word " * 400_000)  # 2 MB, no newline at all
    with zipfile.ZipFile(root / "empty.zip", "w"):
        pass
    with zipfile.ZipFile(root / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.txt", b"a" * (257 * 2**20))  # 257 MiB that packs into well under 1 MB
    outside = tmp_path / "secret.txt"
    outside.write_text("never to be read " * 100)
    (root / "link.txt").symlink_to(outside)
    assert (root / "bomb.zip").stat().st_size < 2**20
    stats = CorpusStats()
    docs = list(iter_documents(root, chunk_chars=8000, stats=stats))
    assert docs and all(len(t) <= 8000 for _, t in docs)  # the huge line is served in pieces
    assert sum(len(t) for _, t in docs) >= 1_999_000
    assert all("never to be read" not in t for _, t in docs)
    assert stats.skipped["link pointing outside the corpus folder"] == 1
    assert stats.skipped["larger than 256 MiB"] == 1


def test_checkpoints_are_never_unpickled():
    # Weights and optimizer state are safetensors; no module calls torch.load (which unpickles) at all.
    import re

    sources = "\n".join(p.read_text() for p in (REPO / "src" / "scratchlm").rglob("*.py"))
    assert not re.search(r"torch\.load\(|^\s*(import|from) pickle|pickle\.loads?\(", sources, re.MULTILINE)


def test_load_32_clients(small_corpus):
    sys.path.insert(0, str(REPO / "bench"))
    from feed_load import run_load

    result = run_load(str(small_corpus), clients=32, seconds=5.0)
    assert result["errors"] == 0 and result["requests"] > 100
    assert result["rss_growth_mib"] < 200  # bounded: the buffers hold their caps
