"""A feed trusts nothing its teachers send: each kind of bad answer an OpenAI-compatible server can give (NaN,
+inf and positive log-probabilities, ids beyond the vocabulary or beyond 16 bits, top-k keyed by token text,
lists of different lengths) is dropped where it enters, counted by teacher and reason in /metrics and /health,
and never reaches a batch; a distilled run from such a feed trains with finite losses.

The teacher is ``hostile_app``: an OpenAI-compatible server written for these tests, on a real socket, that
answers in turn with the kinds of answer it is given (good ones between the bad)."""

from __future__ import annotations

import itertools
import json
import logging
import math

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request, Response
from servers import FeedThread, Records, UvicornThread

from scratchlm.data.remote import FeedClient
from scratchlm.feed.server import ServeConfig
from scratchlm.training import TrainConfig, train

K = 4
BAD = {"nan": "NaN", "posinf": "+inf", "positive": "positive", "beyond": "outside the vocabulary",
       "wide": "outside the vocabulary", "short": "token_logprobs", "unmapped": "maps to no single token id"}


def hostile_app(tokenizer, kinds: list[str]) -> FastAPI:
    """Completions of a few tokens with their top-K (vLLM's shapes, ``token_id:N`` keys), and vLLM's
    ``prompt_logprobs`` when scoring; each answer (each choice, each scoring request) of the next kind in
    ``kinds``: 'good', one of ``BAD``'s, or 'text' (top-k keyed by token text that maps to one id each: as
    OpenAI's, TGI's and llama.cpp's servers key it)."""
    app = FastAPI()
    turn = itertools.cycle(kinds)
    ids = tokenizer.encode(" about the sea and the sky")
    others = tokenizer.encode(" a an of in")[: K - 1]

    def key(kind: str, token: int) -> str:
        if kind == "unmapped":
            return "zz-no-such-token-zz"
        return tokenizer.decode([token]) if kind == "text" else f"token_id:{token}"

    def top(kind: str, token: int) -> dict:
        """The top K at a position whose token is ``token``: it first, then ``others``; a bad kind spoils
        the second entry."""
        entry = {key(kind, t): -1.0 - j for j, t in enumerate([token, *others])}
        if kind in ("nan", "posinf", "positive"):
            entry[key(kind, others[0])] = {"nan": math.nan, "posinf": math.inf, "positive": 0.5}[kind]
        if kind in ("beyond", "wide"):
            del entry[key(kind, others[0])]
            entry[f"token_id:{60000 if kind == 'beyond' else 70000}"] = -1.5
        return entry

    def answer(body: dict) -> Response:  # NaN and Infinity as Python's json writes them (vLLM's too)
        return Response(json.dumps(body, allow_nan=True), media_type="application/json")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "hostile", "object": "model", "max_model_len": 512}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        if body.get("prompt_logprobs"):
            kind, given = next(turn), body["prompt"]
            positions = [None] + [{k.removeprefix("token_id:"): {"logprob": v, "rank": 1}
                                   for k, v in top(kind, t).items()} for t in given[1:]]
            return answer({"choices": [{"index": 0, "text": "", "prompt_logprobs": positions}]})
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        choices = []
        for i in range(len(prompts)):
            kind = next(turn)
            tokens = [key(kind, t) for t in ids]
            lps = [-1.0] * (len(ids) + (1 if kind == "short" else 0))
            choices.append({"index": i, "text": tokenizer.decode(ids), "finish_reason": "length",
                            "logprobs": {"tokens": tokens, "token_logprobs": lps,
                                         "top_logprobs": [top(kind, t) for t in ids]}})
        return answer({"choices": choices})

    return app


def _feed(corpus, url: str, **settings) -> ServeConfig:
    return ServeConfig(**{"corpus": str(corpus), "teacher": [f"openai:{url}"], "teacher_ratio": 0.3,
                          "teacher_max_new_tokens": 8, "soft_labels": K, "eval_fraction": 0.05,
                          "teacher_concurrency": 2, "chunk_chars": 600, **settings})


def _dropped(metrics: str) -> dict[str, float]:
    """scratchlm_teacher_answers_dropped_total by reason, from /metrics text."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith("scratchlm_teacher_answers_dropped_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = found.get(reason, 0) + float(line.rsplit(" ", 1)[1])
    return found


def _check_rows(batch, vocab_size: int) -> None:
    rows = batch.soft_mask
    assert np.isfinite(batch.soft_logprobs[rows][:, 0]).all()
    assert not np.isnan(batch.soft_logprobs[rows]).any() and (batch.soft_logprobs[rows] <= 1e-3).all()
    assert int(batch.soft_ids.max()) < vocab_size and int(batch.token_ids.max()) < vocab_size


def test_every_bad_answer_is_dropped_where_it_enters_counted_and_never_served(small_corpus, tokenizer):
    kinds = ["good", *[k for bad in BAD for k in ("good", bad)], "text"]
    records, logger = Records(), logging.getLogger("scratchlm")
    logger.addHandler(records)
    with UvicornThread(hostile_app(tokenizer, kinds)) as teacher, \
            FeedThread(_feed(small_corpus, teacher.url)) as feed:
        client = FeedClient(feed.url)
        batches = [client.batch(16, None, soft_labels=K) for _ in range(12)]
        # The teacher keeps writing meanwhile: /health is read between two readings of /metrics.
        before = _dropped(httpx.get(feed.url + "/metrics").text)
        health = httpx.get(feed.url + "/health").json()
        dropped = _dropped(httpx.get(feed.url + "/metrics").text)
    served = [b for b in batches if b.soft_mask.any()]
    assert served and sum(b.meta.sources.count("teacher") for b in batches) > 10
    for batch in batches:
        _check_rows(batch, tokenizer.vocab_size)
    listed = health["teachers"][0]["dropped"]
    assert sum(listed.values()) > 0 and set(before) <= set(listed) <= set(dropped)
    assert all(before.get(why, 0) <= n <= dropped[why] for why, n in listed.items()), (before, listed)
    for kind, phrase in BAD.items():
        assert any(phrase in reason for reason in dropped), (kind, dropped)
    # token text that maps to one id each is mapped (the teacher is said to key by text), not dropped
    assert not any("sky" in reason or "sea" in reason for reason in dropped)
    logger.removeHandler(records)
    assert any("keys its log-probabilities by token text" in line for line in records.lines)
    assert any("dropped" in line and "NaN" in line for line in records.lines)


def test_bad_scores_of_corpus_text_leave_it_unlabelled_and_are_counted(small_corpus, tokenizer):
    with UvicornThread(hostile_app(tokenizer, ["good", "nan", "good", "beyond"])) as teacher, \
            FeedThread(_feed(small_corpus, teacher.url, teacher_ratio=0.0, score_corpus=True)) as feed:
        client = FeedClient(feed.url)
        batches = [client.batch(4, None, soft_labels=K) for _ in range(4)]
        metrics = httpx.get(feed.url + "/metrics").text
    labelled = []  # for each corpus text served: whether its tokens after the first have rows
    for batch in batches:
        _check_rows(batch, tokenizer.vocab_size)
        ends = np.cumsum([0] + batch.meta.tokens)
        labelled += [bool(batch.soft_mask[a + 1 : b].all()) for a, b in zip(ends, ends[1:], strict=False)]
    assert True in labelled and False in labelled, labelled  # the good scores kept, the bad ones dropped
    dropped = _dropped(metrics)
    assert any("NaN" in r for r in dropped) and any("outside the vocabulary" in r for r in dropped)


def test_a_distilled_run_from_a_feed_of_good_and_bad_answers_trains_with_finite_losses(small_corpus,
                                                                                         tokenizer, tmp_path):
    kinds = ["good", "nan", "good", "wide", "good", "positive", "good", "short"]
    with UvicornThread(hostile_app(tokenizer, kinds)) as teacher, \
            FeedThread(_feed(small_corpus, teacher.url, score_corpus=True)) as feed:
        summary = train(TrainConfig(model="phi-tiny", data=feed.url, out=str(tmp_path / "run"), block_size=64,
                                    micro_batch_size=4, max_steps=6, eval_batches=1, eval_interval=100,
                                    device="cpu", soft_labels=K, distill_weight=0.5, feed_texts_per_request=4,
                                    warmup_steps=1))
        dropped = _dropped(httpx.get(feed.url + "/metrics").text)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["kd_loss"] for r in records if "kd_loss" in r]
    assert summary["steps"] == 6 and len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(dropped.values()) > 0


@pytest.mark.parametrize("flags,message", [
    (["--soft-labels", "4"], "--soft-labels 4 keeps a teacher's top-k: give --teacher"),
    (["--soft-labels", "1000000", "--teacher", "openai:http://127.0.0.1:9"], "100"),
])
def test_serve_refuses_soft_labels_it_cannot_keep(small_corpus, flags, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "scratchlm", "serve", "--corpus", str(small_corpus), "--port",
                        "0", *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
