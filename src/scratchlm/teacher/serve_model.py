"""``scratchlm serve-model``: an OpenAI-compatible completions server for a Phi checkpoint.

``POST /v1/completions`` (prompt: a string, a list, or token ids; max_tokens, temperature, top_p, top_k, n,
seed, stop, stream, logprobs, echo, and vLLM's prompt_logprobs and return_tokens_as_token_ids) and ``GET
/v1/models``, authenticated like the feed server (the key is checked before a request body is read, and bodies
are capped), so a teacher can run on its own GPU machine and several can serve one feed. Every request's
prompts join the one running batch of the model's generation engine, whatever other requests are in flight;
scoring a prompt (``echo`` with ``logprobs``, ``prompt_logprobs``) is a prefill in the same batch.

Log-probabilities are of the model's raw distribution (before temperature, top-k and top-p), as vLLM's
``raw_logprobs``, in OpenAI's completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (up to
``--max-logprobs`` per token) and ``text_offset``; with ``echo``, the prompt's tokens come first, the first
with no log-probability. ``echo`` with ``max_tokens`` 0 or 1 and ``logprobs`` is how lm-eval's
``local-completions`` computes a log-likelihood.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import Count, DeviceSpec, Port
from ..serving import ServerConfig, harden
from .backends import Completion, LocalTeacher
from .model_metrics import ModelMetrics
from .protocol import TopK
from .sampling import SamplingParams


class ServeModelConfig(ServerConfig):
    """Serve a model through an OpenAI-compatible /v1/completions (for a feed's teacher, or any client)."""

    model: str
    """Hugging Face folder or hub id."""
    port: Port = 8001
    """TCP port."""
    batch_size: Count | None = None
    """Sequences decoded together, across all clients (default: 256 on a GPU, 32 on a CPU)."""
    served_model_name: str | None = None
    """The model's id in /v1/models and in answers (default: its folder's name or hub id; never a path)."""
    max_body_bytes: Count = 8 * 2**20
    """Largest request body accepted (413 beyond it)."""
    max_logprobs: Count = 20
    """Most alternatives a request may ask per token (logprobs, prompt_logprobs), as vLLM's --max-logprobs."""
    device: DeviceSpec = "auto"
    """auto, cpu, cuda or cuda:N."""


MAX_PROMPTS = 1024
UNSUPPORTED = {"suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0)}
"""OpenAI fields this server does not implement, with the values that ask for nothing (accepted)."""

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(BaseModel):
    """The completions request, as OpenAI defines it; fields we do not implement are refused by name."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extras: checked against UNSUPPORTED

    model: str | None = None
    prompt: Annotated[Prompt, Field(description="a prompt, prompts, or token ids (one list or several)")]
    max_tokens: int = Field(16, ge=0, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    n: int = Field(1, ge=1, le=64)
    best_of: int | None = Field(None, ge=1, le=64)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=1024)
    """The log-probability of each token and its ``logprobs`` most likely alternatives (at most the server's
    --max-logprobs)."""
    echo: bool = False
    """Return the prompt before the completion (with ``logprobs``: the prompt's tokens scored too)."""
    prompt_logprobs: int | None = Field(None, ge=0, le=1024)
    """vLLM's: each prompt token's log-probability and the top alternatives, keyed by token id."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: tokens named ``token_id:N`` in ``logprobs`` (what a client that needs the ids asks)."""

    @model_validator(mode="after")
    def _nothing_asked(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 asks for nothing: give at least 1, or echo the prompt to score it")
        return self

    @field_validator("temperature")
    @classmethod
    def _usable_temperature(cls, value: float) -> float:
        if 0 < value < 0.01:
            raise ValueError("temperature must be 0 (greedy) or at least 0.01")
        return value

    @field_validator("prompt")
    @classmethod
    def _valid_unicode(cls, value):
        for text in [value] if isinstance(value, str) else value:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("prompt is not valid Unicode (it holds a lone surrogate)") from None
        return value


def _refuse_unsupported(req: CompletionRequest, max_logprobs: int) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise HTTPException(400, f"'{name}' is not supported by this server (scratchlm serve-model)")
    if req.best_of is not None and req.best_of != req.n:
        raise HTTPException(400, "'best_of' other than n is not supported by this server")
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(req, name) or 0) > max_logprobs:
            raise HTTPException(400, f"'{name}' {getattr(req, name)} is over this server's limit of "
                                     f"{max_logprobs} (serve-model --max-logprobs)")


def _prompt_list(req: CompletionRequest, vocab_size: int) -> list[str] | list[list[int]]:
    """Every prompt, each repeated n times: strings, or token-id lists (checked against the vocabulary)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if any(isinstance(p, list) and any(not 0 <= t < vocab_size for t in p) for p in prompts):
        raise HTTPException(400, f"token ids must lie in [0, {vocab_size})")
    prompts = [p for p in prompts for _ in range(req.n)]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise HTTPException(422, f"between 1 and {MAX_PROMPTS} prompts × n per request")
    return prompts


def _fitting(teacher: LocalTeacher, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The prompts (token ids), if each one and its completion fit in the model's context; else a 400 that
    says so, as vLLM and OpenAI answer (never a prompt cut silently: a client scoring a text would get
    log-probabilities for a text it did not send)."""
    context = teacher.context_length
    for ids in prompts:
        if max(1, len(ids)) + max_tokens > context:
            raise HTTPException(400, f"This model's maximum context length is {context} tokens. However, you "
                                     f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                     f"{max_tokens} for the completion). Please reduce the length of the "
                                     "prompt or the completion.")
    return prompts


class Answer:
    """How one request is answered: each choice's text (after its prompt, with ``echo``) cut at a stop
    string, and its log-probabilities in OpenAI's shape (``logprobs``) and vLLM's (``prompt_logprobs``); token
    strings from the tokenizer, or ``token_id:N`` when the client asks for ids."""

    def __init__(self, teacher: LocalTeacher, req: CompletionRequest) -> None:
        self.decode, self.req = teacher.tokenizer.decode, req
        self.stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])

    def name(self, token: int) -> str:
        return f"token_id:{token}" if self.req.return_tokens_as_token_ids else self.decode([token])

    def choice(self, i: int, prompt: list[int], scored: TopK | None, c: Completion) -> dict:
        text, reason, kept = c.text, "stop" if c.finished else "length", c.tokens
        for s in self.stops:
            if s and s in text:
                text, reason = text[: text.index(s)], "stop"
        if len(text) < len(c.text):  # only the tokens whose text starts before the cut
            starts = np.cumsum([0] + [len(self.decode([t])) for t in c.token_ids])
            kept = int((starts[:-1] < len(text)).sum())
        echoed = self.decode(prompt) if self.req.echo else ""
        out = {"text": echoed + text, "index": i, "logprobs": None, "finish_reason": reason}
        if self.req.logprobs is not None:
            own = c.logprobs or TopK.empty(1)
            own = TopK(own.ids[:kept], own.logprobs[:kept], own.token_logprobs[:kept])
            if self.req.echo:  # the prompt's tokens first; the very first has no log-probability
                out["logprobs"] = self.block_of(prompt + c.token_ids[:kept], [scored, own], 1)
            else:
                out["logprobs"] = self.block_of(c.token_ids[:kept], [own], 0, len(echoed))
        if self.req.prompt_logprobs is not None:
            out["prompt_logprobs"] = self._prompt(prompt, scored)
        return out

    def block_of(self, ids: list[int], parts: list[TopK], blank: int, offset: int = 0) -> dict:
        """``logprobs`` for tokens ``ids``, whose rows are ``parts`` end to end (the first ``blank`` tokens
        have none)."""
        k = self.req.logprobs or 0
        rows = [(t, v, lp) for part in parts for t, v, lp in zip(part.ids, part.logprobs, part.token_logprobs,
                                                                   strict=True)]
        tops = [None] * blank + [{self.name(int(t)): float(v) for t, v in zip(ids_[:k], lps[:k], strict=True)}
                                 for ids_, lps, _ in rows]
        lengths = [len(self.decode([t])) for t in ids]
        return {"tokens": [self.name(t) for t in ids],
                "token_logprobs": [None] * blank + [float(lp) for _, _, lp in rows], "top_logprobs": tops,
                "text_offset": [offset + int(o) for o in np.cumsum([0] + lengths[:-1])] if ids else []}

    def _prompt(self, prompt: list[int], scored: TopK) -> list:
        """vLLM's ``prompt_logprobs``: None for the first token, then for each token its top alternatives and
        itself, keyed by id, with their ranks."""
        k = self.req.prompt_logprobs or 0
        out: list = [None]
        for n, token in enumerate(prompt[1:]):
            entry = {str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": self.decode([int(t)])}
                     for r, (t, v) in enumerate(zip(scored.ids[n, :k], scored.logprobs[n, :k], strict=True))}
            entry[str(token)] = {"logprob": float(scored.token_logprobs[n]),
                                 "rank": int(scored.token_ranks[n]), "decoded_token": self.decode([token])}
            out.append(entry)
        return out


def model_id(model: str) -> str:
    """What /v1/models calls a model: its folder's name, never its local path (or the hub id as it is)."""
    local = Path(model).expanduser()
    return local.resolve().name if local.exists() else model


def create_app(teacher: LocalTeacher, model_name: str, api_key: str | None,
               max_body_bytes: int = 8 * 2**20, max_logprobs: int = 20) -> FastAPI:
    app = FastAPI(title="scratchlm serve-model", description=__doc__)
    metrics = ModelMetrics(teacher.engine)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "scratchlm",
                                            "max_model_len": teacher.context_length}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        _refuse_unsupported(req, max_logprobs)
        prompts = _fitting(teacher, teacher.token_ids(_prompt_list(req, teacher.tokenizer.vocab_size)),
                           req.max_tokens)
        params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p if req.top_p < 1.0 else None, top_k=req.top_k,
                                logprobs=max(1, req.logprobs) if req.logprobs is not None else 0)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        answer = Answer(teacher, req)
        try:
            if req.max_tokens:
                teacher.check(params)
            # The prompts scored (a prefill in the same batch as everyone's generation), where asked.
            k = max(req.logprobs or 0, req.prompt_logprobs or 0, 1)
            scoring = (req.echo and req.logprobs is not None) or req.prompt_logprobs is not None
            ranks = req.prompt_logprobs is not None  # vLLM's form reports where each given token ranks
            scored = teacher.submit_score(prompts, k, ranks) if scoring else None
            metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
            if req.stream:
                return StreamingResponse(_stream(teacher, prompts, params, req.seed, answer, scored, head,
                                                 metrics), media_type="text/event-stream")
            outs = (teacher.submit(prompts, params, req.seed).result() if req.max_tokens
                    else [Completion([], "", False) for _ in prompts])
        except ValueError as err:  # e.g. more new tokens than the model's context leaves room for
            raise HTTPException(400, str(err)) from None
        rows = scored.result() if scored is not None else [None] * len(prompts)
        completion_tokens = sum(c.tokens for c in outs)
        metrics.generated_tokens.inc(completion_tokens)
        prompt_tokens = sum(len(ids) for ids in prompts)
        return {**head, "choices": [answer.choice(i, p, r, c) for i, (p, r, c) in
                                    enumerate(zip(prompts, rows, outs, strict=True))],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return harden(app, api_key, max_body_bytes, lambda status: metrics.requests.labels(str(status)).inc())


class TokenStream:
    """One choice's text as its tokens arrive: each new piece once it is whole (a token can end inside a UTF-8
    character), cut at the first stop string."""

    def __init__(self, answer: Answer) -> None:
        self.answer, self.ids, self.sent, self.stopped = answer, [], "", False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.answer.decode(self.ids)
        if text.endswith("\ufffd"):  # the rest of a character is still to come
            return ""
        for stop in self.answer.stops:
            if stop and stop in text:
                text, self.stopped = text[: text.index(stop)], True
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _stream(teacher: LocalTeacher, prompts: list, params: SamplingParams, seed: int | None, answer: Answer,
            scored, head: dict, metrics: ModelMetrics):
    """Server-sent events, OpenAI's stream format: a chunk per token of each choice as the engine accepts it
    (with its log-probabilities when asked), a last chunk per choice with its finish reason, then ``[DONE]``.
    Prompt i samples with seed + i, as in one request."""
    started = time.monotonic()
    rows = scored.result() if scored is not None else [None] * len(prompts)

    def chunk(i: int, text: str, logprobs=None, reason=None) -> str:
        choice = {"text": text, "index": i, "logprobs": logprobs, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    if answer.req.echo:  # the prompt first (scored, when log-probabilities are asked)
        for i, p in enumerate(prompts):
            echoed = answer.choice(i, p, rows[i], Completion([], "", False))
            yield chunk(i, echoed["text"], echoed["logprobs"])
    if not params.max_new_tokens:
        yield from (chunk(i, "", reason="length") for i in range(len(prompts)))
        yield "data: [DONE]\n\n"
        return
    events: queue.Queue = queue.Queue()
    futures = [teacher.submit([p], params, None if seed is None else seed + i,
                              on_token=lambda _, token, row, i=i: events.put((i, token, row)))
               for i, p in enumerate(prompts)]
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: events.put((i, None, f)))
    streams, first, done = [TokenStream(answer) for _ in prompts], True, 0
    while done < len(prompts):
        i, token, row = events.get()
        if token is None:  # the choice is complete
            completion = row.result()[0]
            metrics.generated_tokens.inc(completion.tokens)
            reason = "stop" if completion.finished or streams[i].stopped else "length"
            yield chunk(i, "", reason=reason)
            done += 1
            continue
        if first:
            metrics.first_token.observe(time.monotonic() - started)
            first = False
        text = streams[i].add(token)
        logprobs = None
        if answer.req.logprobs is not None and not streams[i].stopped:
            logprobs = answer.block_of([token], [row or TopK.empty(1)], 0)
        if text or logprobs:
            yield chunk(i, text, logprobs)
    yield "data: [DONE]\n\n"


def serve_model(cfg: ServeModelConfig, background: bool = False):
    """serve-model with ``cfg``'s address and limits: in the foreground until interrupted, or (``background``)
    in a thread, returning the started ``BackgroundServer``."""
    from ..serving import BackgroundServer, run_server

    api_key = cfg.checked_key("model")
    teacher = LocalTeacher(cfg.model, device=cfg.device, batch_size=cfg.batch_size)
    app = create_app(teacher, cfg.served_model_name or model_id(cfg.model), api_key, cfg.max_body_bytes,
                     cfg.max_logprobs)
    if background:
        return BackgroundServer(app, cfg, on_stop=teacher.close).start()
    run_server(app, cfg)
