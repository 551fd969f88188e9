"""The feed's teachers over real sockets: a share that holds (strict) or warns (best-effort), several
teachers, a server that takes one prompt at a time, and the trainer's record of what it ate.

The teachers here are ``servers.slow_completions_app``: an OpenAI-compatible server written for these tests
that sleeps per token, so it is slower than the reader by a known amount."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from servers import FeedThread, Records, UvicornThread, slow_completions_app

from scratchlm.data.remote import FeedClient
from scratchlm.feed.server import ServeConfig, build
from scratchlm.training import TrainConfig, train


@pytest.fixture
def feed_log():
    handler, logger = Records(), logging.getLogger("scratchlm")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def teacher_feed(corpus, *urls: str, **settings) -> ServeConfig:
    """A feed with the stand-in teachers at ``urls``; the share counted in texts unless ``settings`` say
    otherwise (the tests of the strict and best-effort mechanisms count texts)."""
    return ServeConfig(**{"corpus": str(corpus), "teacher": [f"openai:{u}" for u in urls],
                          "teacher_ratio": 0.3, "teacher_ratio_unit": "texts",
                          "teacher_max_new_tokens": 10, "eval_fraction": 0.05, **settings})


def test_strict_mode_holds_the_share_in_every_response_with_a_slow_teacher(small_corpus):
    # 0.5 s per request of 4 texts, 8 requests at once: at most 64 teacher texts a second, about 10× below
    # what the reader takes when it need not wait (measured below).
    with UvicornThread(slow_completions_app(0.05)) as teacher, \
            FeedThread(teacher_feed(small_corpus, teacher.url, teacher_concurrency=8)) as feed:
        client = FeedClient(feed.url)
        t0 = time.monotonic()
        replies = [client.batch(20, None) for _ in range(100)]
        took = time.monotonic() - t0
        corpus_only = time.monotonic()
        for _ in range(100):  # the same client and sizes, corpus text only: the reader when it need not wait
            client.heldout(20)
        reader = time.monotonic() - corpus_only
    shares = [r.sources.count("teacher") for r in replies]
    assert sum(len(r.texts) for r in replies) == 2000 and sum(shares) == 600
    assert all(5 <= s <= 7 for s in shares), shares  # 30% ± 1 text in every response
    assert took > 0.9 * 600 / 64  # the reader went at the teacher's pace instead of taking corpus text...
    assert took > 5 * reader  # ...well below its own (about 10× on an idle machine, less under load)


def test_best_effort_mode_warns_when_the_share_falls_behind(small_corpus, feed_log):
    with UvicornThread(slow_completions_app(0.05)) as teacher:  # 2 × 4 texts per 0.5 s: 16 a second
        cfg = teacher_feed(small_corpus, teacher.url, teacher_mode="best-effort", teacher_concurrency=2)
        with FeedThread(cfg) as feed:
            client = FeedClient(feed.url)
            sources = [s for _ in range(100) for s in client.batch(20, None).sources]
            health = httpx.get(feed.url + "/health").json()
    assert sources.count("teacher") < 0.25 * len(sources)  # never waited: corpus text filled in
    assert "teacher share over the last 1,000 texts" in health["warning"]
    assert any("teachers are behind" in line for line in feed_log)


def test_two_teachers_one_killed_midway(small_corpus):
    with UvicornThread(slow_completions_app(0.005)) as first, \
            UvicornThread(slow_completions_app(0.005)) as second:
        with FeedThread(teacher_feed(small_corpus, first.url, second.url, teacher_stall_s=5)) as feed:
            client = FeedClient(feed.url)
            before = [s for _ in range(20) for s in client.batch(20, None).sources]
            both = httpx.get(feed.url + "/health").json()["teachers"]
            second.stop()
            after = [s for _ in range(50) for s in client.batch(20, None).sources]
            deadline = time.monotonic() + 10
            while (health := httpx.get(feed.url + "/health").json())["teachers"][1]["up"]:
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            metrics = httpx.get(feed.url + "/metrics").text
    assert [t["up"] for t in both] == [True, True] and all(t["texts"] > 0 for t in both)  # both did work
    assert before.count("teacher") == 120 and after.count("teacher") == 300  # the share held throughout
    assert health["teacher"] == "up" and [t["up"] for t in health["teachers"]] == [True, False]
    assert f'scratchlm_teacher_backend_up{{teacher="openai:{second.url}"}} 0.0' in metrics


def test_a_server_that_takes_one_prompt_per_request_is_detected(small_corpus, feed_log):
    # llama.cpp's OpenAI-compatible server answers 500 (with an empty message) to a list of prompts.
    app = slow_completions_app(0.001, one_prompt_only=True)
    with UvicornThread(app) as teacher, FeedThread(teacher_feed(small_corpus, teacher.url)) as feed:
        sources = [s for _ in range(10) for s in FeedClient(feed.url).batch(20, None).sources]
    assert sources.count("teacher") == 60
    assert app.state.requests[0] == 4 and set(app.state.requests[-20:]) == {1}  # refused once, then one each
    assert any("refused a list of 4 prompts (500" in line and "one prompt per request" in line
               for line in feed_log)


def test_a_share_of_tokens_holds_in_every_answer_and_health_and_metrics_agree(small_corpus):
    # The shape: teacher texts of about 128 tokens among corpus chunks of 8,000 characters (about
    # 2,000 tokens): 30% of texts would be a few percent of tokens.
    with UvicornThread(slow_completions_app(0.0001)) as teacher, \
            FeedThread(teacher_feed(small_corpus, teacher.url, teacher_ratio_unit="tokens",
                                    teacher_max_new_tokens=128)) as feed:
        client = FeedClient(feed.url)
        teacher_tokens = total = 0
        for _ in range(30):
            reply = client.batch(16, None, tokens=True)
            sizes = reply.meta.tokens
            teacher_tokens += sum(n for n, s in zip(sizes, reply.meta.sources, strict=True) if s == "teacher")
            total += sum(sizes)
            assert abs(teacher_tokens - 0.3 * total) <= max(sizes)  # within one text after every answer
        health = httpx.get(feed.url + "/health").json()
        metrics = httpx.get(feed.url + "/metrics").text
    share = teacher_tokens / total
    assert abs(share - 0.3) < 0.01
    assert health["teacher_ratio_unit"] == "tokens"
    assert health["teacher_token_share_realised"] == round(share, 4)
    assert health["teacher_text_share_realised"] > 0.8  # short texts: most texts are the teacher's
    assert f'scratchlm_tokens_served_total{{source="teacher"}} {float(teacher_tokens)}' in metrics
    assert f"scratchlm_teacher_token_share_realised {share}" in metrics


def test_training_from_a_strict_feed_records_its_teacher_token_share(small_corpus, tmp_path):
    # Texts of about 200 teacher tokens among corpus documents of about 250, 30% of tokens from the teacher.
    with UvicornThread(slow_completions_app(0.0001)) as teacher:
        cfg = teacher_feed(small_corpus, teacher.url, teacher_max_new_tokens=200, chunk_chars=1000,
                           teacher_ratio_unit="tokens")
        with FeedThread(cfg) as feed:
            served: list = []
            batch = feed.feed.batch

            def recording(*args, **kwargs):  # observe what the trainer is sent, in order
                served.append(batch(*args, **kwargs))
                return served[-1]

            feed.feed.batch = recording
            # No shuffling: the batches are the stream's consecutive blocks, so each step's share is known.
            train(TrainConfig(model="phi-tiny", data=feed.url, out=str(tmp_path / "run"), block_size=64,
                              micro_batch_size=8, max_steps=30, eval_interval=1000, eval_batches=1,
                              device="cpu", feed_texts_per_request=4, feed_shuffle_tokens=0, log_interval=10))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["teacher_token_share"] for r in records if "loss" in r]
    # The stream the trainer packed: every reply's tokens in order (the ids the feed sent: never tokenized
    # again), cut into blocks of 65; a step's share counts its targets (a block's tokens after the first).
    teacher = np.concatenate([reply.teacher_mask() for reply in served])
    blocks = teacher[: len(teacher) // 65 * 65].reshape(-1, 65)[:, 1:]
    expected = [blocks[i * 8 : (i + 1) * 8].mean() for i in range(30)]
    assert len(logged) == 30 and np.allclose(logged, expected, atol=1e-6)
    assert abs(np.mean(logged) - 0.3) < 0.02
    assert "teacher" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
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
