"""The feed server over a real socket (uvicorn in a subprocess or thread), the real corpus, the real
client."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from servers import FeedThread, UvicornThread

from scratchlm.config import ConfigError
from scratchlm.data.reading import FeedReading
from scratchlm.data.remote import FeedClient, FeedError
from scratchlm.feed.server import ServeConfig, build
from scratchlm.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def open_server(small_corpus):
    with FeedThread(ServeConfig(corpus=str(small_corpus), batch_size=8, eval_fraction=0.05)) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(small_corpus, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text("s3cret-key\n")
    with FeedThread(ServeConfig(corpus=str(small_corpus), api_key_file=str(key_file))) as s:
        yield s


def test_seed_client_pattern_returns_non_empty_strings(open_server):
    texts = requests.get(open_server.url + "/generate").json()
    assert isinstance(texts, list) and len(texts) == 8
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert requests.get(open_server.url + "/generate").json() != texts  # the stream moves on


def test_batch_resumes_exactly_from_a_cursor(open_server):
    client = FeedClient(open_server.url)
    straight = client.batch(30, None)
    first = client.batch(12, None)
    rest = client.batch(18, first.cursor)
    assert first.texts + rest.texts == straight.texts
    assert first.ids + rest.ids == straight.ids
    assert rest.cursor == straight.cursor and set(straight.sources) == {"corpus"}
    # Ranks get disjoint streams.
    r0, r1 = client.batch(20, None, 0, 2), client.batch(20, None, 1, 2)
    assert not set(r0.ids) & set(r1.ids)
    held = set(client.heldout(100))
    assert held and not held & set(straight.texts + r0.texts + r1.texts)


def test_token_answers_carry_the_tokenizers_ids_and_resume_the_same(open_server, tokenizer):
    client = FeedClient(open_server.url)
    texts = client.batch(6, None)
    ids = client.batch(6, None, tokens=True)
    assert ids.meta.ids == texts.ids and ids.meta.cursor == texts.cursor and ids.meta.texts == []
    assert ids.token_ids.tolist() == tokenizer.encode_documents(texts.texts).tolist()  # each + <|endoftext|>
    assert ids.meta.tokens == [len(tokenizer.encode(t)) + 1 for t in texts.texts]
    again = client.batch(4, client.batch(2, None, tokens=True).meta.cursor, tokens=True)
    assert again.meta.ids == texts.ids[2:]
    r = httpx.get(f"{open_server.url}/v1/batch?size=2&tokens=1")
    assert r.headers["content-type"] == "application/vnd.scratchlm.token-batch+safetensors"
    assert httpx.get(open_server.url + "/health").json()["tokenizer"] == tokenizer.digest


def test_concurrent_generate_calls_serve_each_document_once(small_corpus):
    # 8 clients at once must get, between them, exactly the documents that as many calls in a row get: the
    # shared stream is read and advanced as one step. Frequent thread switches make an interleaving likely.
    import sys
    from collections import Counter

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        cfg = ServeConfig(corpus=str(small_corpus), batch_size=16, eval_fraction=0.05)
        with FeedThread(cfg) as s:
            sequential = Counter(t for _ in range(64) for t in httpx.get(s.url + "/generate").json())
        with FeedThread(cfg) as s:
            texts: list[str] = []

            def client() -> None:
                with httpx.Client() as http:
                    for _ in range(8):
                        texts.extend(http.get(s.url + "/generate").json())

            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(sequential.values()) == 64 * 16
    assert Counter(texts) == sequential


def test_bad_requests_get_4xx_with_a_message(open_server):
    for query, status in [("size=0", 422), ("size=100000", 422), ("size=abc", 422), ("cursor=nonsense", 400),
                          ("cursor=v1-00000000-0-5", 400), ("rank=3&world_size=2", 422)]:
        r = httpx.get(f"{open_server.url}/v1/batch?{query}")
        assert r.status_code == status, (query, r.status_code)
        assert r.json()["detail"], query
    r = httpx.get(f"{open_server.url}/v1/batch?cursor=" + "x" * 5000)
    assert r.status_code == 414 and "longer" in r.json()["detail"]
    with pytest.raises(FeedError, match="422"):
        FeedClient(open_server.url).batch(0, None)


def test_api_key_is_required_except_for_health(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200
    for path in ("/generate", "/v1/batch", "/metrics", "/openapi.json", "/docs", "/v1/heldout"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    good = {"Authorization": "Bearer s3cret-key"}
    assert httpx.get(url + "/generate", headers=good).status_code == 200
    assert "/v1/batch" in httpx.get(url + "/openapi.json", headers=good).json()["paths"]
    os.environ["SCRATCHLM_API_KEY"] = "s3cret-key"
    try:
        from scratchlm.data.remote import client_from_env

        assert client_from_env(url).batch(2, None).texts
    finally:
        del os.environ["SCRATCHLM_API_KEY"]


def test_non_loopback_bind_without_key_is_refused(small_corpus, monkeypatch):
    monkeypatch.delenv("SCRATCHLM_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0 without an API key"):
        build(ServeConfig(corpus=str(small_corpus), host="0.0.0.0"))
    r = subprocess.run([sys.executable, "-m", "scratchlm", "serve", "--corpus", str(small_corpus), "--host",
                        "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "refusing to bind" in r.stderr and "Traceback" not in r.stderr


def test_public_tunnel_needs_key_and_token(small_corpus, tmp_path, monkeypatch):
    # The ngrok tunnel cannot be reached from here; what we can test is that --public is refused unsafely.
    monkeypatch.delenv("SCRATCHLM_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="--public"):
        build(ServeConfig(corpus=str(small_corpus), public=True))
    from scratchlm.feed.server import open_tunnel

    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)
    with pytest.raises(ConfigError, match="NGROK_AUTHTOKEN"):
        open_tunnel(8000)


def test_bad_corpus_files_are_served_around_skipped_and_counted(corpus_dir, tmp_path):
    zpath = tmp_path / "sample.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("good.txt",
                   (corpus_dir / "books" / "pg11_alices_adventures_in_wonderland.txt").read_bytes())
        z.writestr("corrupt.txt", b"text to damage " * 1000)
        z.writestr("binary.txt", bytes(range(256)) * 40)
        z.writestr("empty.txt", b"")
    raw = bytearray(zpath.read_bytes())
    at = raw.find(b"corrupt.txt") + 40
    raw[at : at + 20] = b"\xff" * 20
    zpath.write_bytes(bytes(raw))
    with FeedThread(ServeConfig(corpus=str(zpath))) as s:
        texts = requests.get(s.url + "/generate").json()
        assert texts and all("text to damage" not in t for t in texts)
        metrics = httpx.get(s.url + "/metrics").text
    assert 'scratchlm_corpus_files_skipped{reason="binary"} 1.0' in metrics
    assert 'scratchlm_corpus_files_skipped{reason="empty"} 1.0' in metrics
    assert 'scratchlm_corpus_files_skipped{reason="corrupt zip member"} 1.0' in metrics
    assert 'scratchlm_texts_served_total{source="corpus"} 16.0' in metrics


def test_teacher_mix_holds_ratio_and_never_starves(small_corpus):
    # A teacher stand-in that is a real producer thread's input: fast at first, then down, then back.
    state = {"down": False}

    def produce(n: int) -> list[str]:
        if state["down"]:
            raise ConnectionError("teacher unreachable")
        return [f"teacher text {time.time_ns()} {i}" for i in range(n)]

    cfg = ServeConfig(corpus=str(small_corpus), teacher_ratio=0.3, teacher_ratio_unit="texts",
                      teacher_mode="best-effort", teacher_deadline_s=0.05)
    with FeedThread(cfg, teacher=produce) as s:
        time.sleep(0.3)
        client = FeedClient(s.url)
        sources = [src for _ in range(50) for src in client.batch(20, None).sources]
        share = sources.count("teacher") / len(sources)
        assert abs(share - 0.3) <= 0.05, share
        state["down"] = True
        time.sleep(1.0)
        t0 = time.monotonic()
        reply = client.batch(20, None)
        assert len(reply.texts) == 20 and time.monotonic() - t0 < 2.0  # answered from the corpus
        assert httpx.get(s.url + "/health").json()["teacher"] == "down"
        assert "scratchlm_teacher_up 0.0" in httpx.get(s.url + "/metrics").text
        state["down"] = False
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").json()["teacher"] != "up":
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_training_from_the_feed_resumes_exactly_with_its_shuffle_buffer(open_server, tmp_path):
    # The buffer's blocks, the tokens not yet cut and the number of draws are in the checkpoint: a resumed run
    # sees the same batches as an uninterrupted one. The buffer is in tokens (the default budget), held to the
    # 20 steps the schedule plans: each run draws from all 80 of its blocks at once, then fewer.
    common = dict(model="phi-tiny", data=open_server.url, block_size=64, micro_batch_size=4, eval_batches=1,
                  lr_decay_steps=20, warmup_steps=2, eval_interval=100, checkpoint_interval=10, device="cpu",
                  feed_texts_per_request=2)
    train(TrainConfig(**common, out=str(tmp_path / "straight"), max_steps=20))
    train(TrainConfig(**common, out=str(tmp_path / "resumed"), max_steps=10))
    saved = tmp_path / "resumed" / "checkpoints" / "step-00000010"
    assert (saved / "data.safetensors").exists()  # the buffer, beside state.json
    train(TrainConfig(**common, out=str(tmp_path / "resumed"), max_steps=20, resume="auto"))

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads,
                                                  (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 21))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in range(1, 21)), (a, b)


def test_corpus_texts_come_as_seeded_windows_met_in_proportion_to_their_tokens(open_server, tokenizer):
    # A trainer asks for windows of its block's span: each corpus text is a window of the corpus stream
    # (documents end to end, each followed by <|endoftext|>) from a seeded place in its document, the same on
    # every asking; over an epoch each document comes once per window of its tokens, as corpus blocks meet it.
    client, eot, corpus = FeedClient(open_server.url), tokenizer.eot_id, open_server.feed.corpus
    windowed, again = (client.batch(24, None, window=65) for _ in range(2))
    assert np.array_equal(windowed.token_ids, again.token_ids) and windowed.meta.cursor == again.meta.cursor
    assert windowed.meta.tokens == [65] * 24  # whole windows: the loader's blocks stay aligned with them
    index = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    pieces = np.split(windowed.token_ids, np.cumsum(windowed.meta.tokens)[:-1])

    def stream_from(i: int, documents: int) -> tuple[int, np.ndarray]:
        """Document i's tokens and those of the documents after it, each followed by <|endoftext|>."""
        docs = [tokenizer.encode(corpus.texts[(i + j) % len(corpus.texts)]) + [eot] for j in range(documents)]
        return len(docs[0]), np.concatenate(docs)

    starts = []
    for doc_id, piece in zip(windowed.meta.ids, pieces, strict=True):
        first, stream = stream_from(index[doc_id], 2)
        starts.append(next(a for a in range(first) if np.array_equal(stream[a : a + 65], piece)))
    assert len(set(starts)) > 3, starts  # seeded places, not each document's start
    # A window longer than its document runs on past its <|endoftext|> into the next ones, as a block does.
    long = client.batch(3, None, window=5000)
    for doc_id, piece in zip(long.meta.ids, np.split(long.token_ids, 3), strict=True):
        first, stream = stream_from(index[doc_id], 6)
        assert len(piece) == 5000 and any(np.array_equal(stream[a : a + 5000], piece) for a in range(first))
    lengths = np.array([len(ids) + 1 for ids in tokenizer.encode_batch(list(corpus.texts))])
    assert np.array_equal(np.bincount(corpus.slots(65, tokenizer), minlength=len(lengths)), -(-lengths // 65))
    # the walk over windows is another order: a cursor of one is refused by the other
    whole = client.batch(2, None, tokens=True)
    with pytest.raises(FeedError, match="another corpus or seed"):
        client.batch(2, whole.meta.cursor, window=65)
    with pytest.raises(FeedError, match="window"):
        client.batch(2, None, window=-1)


def test_the_feeds_token_stream_is_kept_and_a_copy_cut_short_is_made_again(open_server, small_corpus,
                                                                            tokenizer):
    # Windows are slices of the corpus stream, tokenized once and kept beside the text store; a kept copy cut
    # short (a full disk, a killed server) is tokenized again, and the same windows come out of it.
    from scratchlm.data import CorpusReading
    from scratchlm.feed.corpus import CorpusSource

    served = open_server.feed.corpus
    served.slots(65, tokenizer)
    kept = next(served.folder.glob(f"train.stream-{tokenizer.digest}.npy"))
    whole, written = kept.stat().st_size, kept.stat().st_mtime_ns
    reading = CorpusReading(eval_fraction=0.05)
    places = [(d, (0, d)) for d in range(0, len(served.texts), max(1, len(served.texts) // 7))]
    windows = [served.window(d, place, 65, tokenizer) for d, place in places]
    again = CorpusSource(str(small_corpus), served.seed, reading)
    assert [again.window(d, place, 65, tokenizer) for d, place in places] == windows
    assert kept.stat().st_mtime_ns == written  # read from the kept copy, not tokenized again
    kept.write_bytes(kept.read_bytes()[: whole // 2])
    cut = CorpusSource(str(small_corpus), served.seed, reading)
    assert [cut.window(d, place, 65, tokenizer) for d, place in places] == windows
    assert kept.stat().st_size == whole


def test_ranks_draw_from_disjoint_streams_and_batches_mix_documents(open_server, tokenizer):
    from scratchlm.data.remote import FeedBlockLoader

    served: dict[int, list] = {0: [], 1: []}
    batch = open_server.feed.batch

    def recording(n, cursor, rank=0, *args, **kwargs):
        served[rank].append(batch(n, cursor, rank, *args, **kwargs))
        return served[rank][-1]

    open_server.feed.batch = recording
    try:
        blocks = {}
        for rank in (0, 1):
            loader = iter(FeedBlockLoader(FeedClient(open_server.url), 64, 8, 5,
                                          FeedReading(feed_shuffle_tokens=256 * 65), 0, rank=rank,
                                          world_size=2, prefetch=1))
            blocks[rank] = [next(loader).inputs for _ in range(5)]
            loader.close()
    finally:
        open_server.feed.batch = batch
    assert all(len(replies) > 8 for replies in served.values())
    # Disjoint: the ranks walk alternate slots of each epoch's order (a slot a window of a document; two
    # slots of one document may cut overlapping windows, as a corpus run's sampling may meet a place twice).
    from scratchlm.feed.corpus import Cursor

    corpus = open_server.feed.corpus
    n = len(corpus.slots(65, tokenizer))
    places = [{place for _, place, _ in itertools.islice(corpus.walk(Cursor(0, 0), rank, 2, 65), n // 2)}
              for rank in (0, 1)]
    assert not places[0] & places[1] and places[0] | places[1] == {(0, i) for i in range(n // 2 * 2)}
    rows = {rank: {tuple(row.tolist()) for b in bs for row in b} for rank, bs in blocks.items()}
    assert len(rows[0]) == len(rows[1]) == 40 and not rows[0] & rows[1]
    # Drawn at random from 256 blocks, a batch's rows come from far apart in the stream, not from one place.
    stream = torch.from_numpy(np.concatenate([r.token_ids for r in served[0]]).astype(np.int64))
    order = [tuple(b[:-1].tolist()) for b in stream[: len(stream) // 65 * 65].view(-1, 65)]
    where = [order.index(tuple(row.tolist())) for row in blocks[0][0]]
    assert max(where) - min(where) > 64, where


@pytest.mark.parametrize("block_size,batch_size", [(64, 32), (4096, 2)])
def test_the_shuffle_buffer_holds_its_token_budget_at_any_block_size(open_server, block_size, batch_size):
    """The default buffer, in tokens: within its stated memory (5 bytes a token, and at most one reply over
    the budget) at a small block and a large one; at block 64 a batch's blocks come from nearly as many
    documents as it has rows, as from a corpus."""
    from scratchlm.data.blocks import FEED_SHUFFLE_TOKENS
    from scratchlm.data.remote import FeedBlockLoader

    served, batch = [], open_server.feed.batch

    def recording(*args, **kwargs):
        served.append(batch(*args, **kwargs))
        return served[-1]

    open_server.feed.batch = recording
    try:
        loader = FeedBlockLoader(FeedClient(open_server.url), block_size, batch_size, 1337, FeedReading(), 0)
        batches = iter(loader)
        first = next(batches)
        batches.close()
    finally:
        open_server.feed.batch = batch
    drawn = first.inputs.shape[0] * (block_size + 1) * 5
    held = sum(v.nbytes for v in loader.buffer.columns.values()) + drawn
    one_reply = max(len(r.token_ids) for r in served)
    assert held <= (FEED_SHUFFLE_TOKENS + one_reply) * 5, held
    assert len(loader.buffer) + batch_size >= FEED_SHUFFLE_TOKENS // (block_size + 1)
    if block_size == 64:
        # Which document each row began in: the served stream, token by token.
        stream = np.concatenate([r.token_ids for r in served]).astype(np.int64)
        doc = np.repeat(np.arange(sum(len(r.meta.ids) for r in served)),
                        np.concatenate([r.meta.tokens for r in served]))
        blocks = stream[: len(stream) // 65 * 65].reshape(-1, 65)
        starts = {tuple(b[:-1].tolist()): i * 65 for i, b in enumerate(blocks)}
        rows = first.inputs.numpy()
        documents = {int(doc[starts[tuple(row.tolist())]]) for row in rows}
        assert len(documents) >= 0.8 * batch_size, len(documents)


def test_wait_ready_waits_for_a_cold_teacher_and_gives_up_on_a_dead_one(small_corpus):
    def cold(n: int) -> list[str]:
        time.sleep(0.5)  # loading, warming up
        return [f"text {k}" for k in range(n)]

    def dead(n: int) -> list[str]:
        raise ConnectionError("refused")

    t0 = time.monotonic()  # the teacher starts working as the feed is built
    with FeedThread(ServeConfig(corpus=str(small_corpus), teacher_ratio=0.3), teacher=cold) as ready, \
            FeedThread(ServeConfig(corpus=str(small_corpus), teacher_ratio=0.3), teacher=dead) as down:
        assert ready.feed.teachers.wait_ready(timeout_s=10) and 0.4 < time.monotonic() - t0 < 5
        assert not down.feed.teachers.wait_ready(timeout_s=1) and not down.feed.teachers.up


@pytest.mark.slow
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



@pytest.mark.slow
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



@pytest.mark.slow
def test_load_32_clients(small_corpus):
    sys.path.insert(0, str(REPO / "bench"))
    from feed_load import run_load

    result = run_load(str(small_corpus), clients=32, seconds=5.0)
    assert result["errors"] == 0 and result["requests"] > 100
    assert result["rss_growth_mib"] < 200  # bounded: the buffers hold their caps


@pytest.fixture(scope="module")
def feed(small_corpus):
    with FeedThread(ServeConfig(corpus=str(small_corpus), eval_fraction=0.05)) as server:
        yield server



def test_cursors_with_unicode_digits_are_refused_and_every_error_is_counted(feed):
    fingerprint = feed.feed.corpus.fingerprint
    for cursor in (f"v1-{fingerprint}-²-0", f"v1-{fingerprint}-0-¹", f"v1-{fingerprint}-①-0"):
        r = httpx.get(feed.url + "/v1/batch", params={"cursor": cursor})
        assert r.status_code == 400 and "malformed" in r.json()["detail"], cursor
    assert httpx.get(feed.url + "/v1/batch?cursor=" + "x" * 5000).status_code == 414
    batch = feed.feed.batch

    def broken(*args, **kwargs):  # a fault injected for this test: the route fails inside
        raise RuntimeError("injected")

    feed.feed.batch = broken
    try:
        assert httpx.get(feed.url + "/v1/batch").status_code == 500
    finally:
        feed.feed.batch = batch
    metrics = httpx.get(feed.url + "/metrics").text
    for status, n in (("400", 3), ("414", 1), ("500", 1)):
        assert f'scratchlm_request_errors_total{{status="{status}"}} {n}.0' in metrics, status
