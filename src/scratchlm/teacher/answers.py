"""A completion request as serve-model takes it (OpenAI's fields and vLLM's, checked), and how it is
answered: each choice's text and log-probabilities in OpenAI's shapes (and vLLM's ``prompt_logprobs``),
streamed as server-sent events token by token or whole; and the wait for the engine, which gives up the work
of a client that went away."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Future
from typing import Annotated

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .backends import Completion, LocalTeacher
from .model_metrics import ModelMetrics
from .protocol import TopK
from .sampling import SamplingParams

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
            if self.req.echo:  # the prompt's tokens first; its very first has no log-probability
                ids = prompt + c.token_ids[:kept]
                out["logprobs"] = self.block_of(ids, [scored, own], min(1, len(prompt)))
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
        out: list = [None] if prompt else []
        for n, token in enumerate(prompt[1:]):
            entry = {str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": self.decode([int(t)])}
                     for r, (t, v) in enumerate(zip(scored.ids[n, :k], scored.logprobs[n, :k], strict=True))}
            entry[str(token)] = {"logprob": float(scored.token_logprobs[n]),
                                 "rank": int(scored.token_ranks[n]), "decoded_token": self.decode([token])}
            out.append(entry)
        return out


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


DISCONNECT_POLL_S = 0.25
"""How often a request waiting for the engine looks whether its client is still there."""


async def until_done(futures: list[Future], request: Request) -> bool:
    """Wait for the engine's futures; False, with them cancelled (the engine drops their sequences at its
    next step), if the client goes away first."""
    for future in futures:
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), DISCONNECT_POLL_S)
                break
            except TimeoutError:
                if await request.is_disconnected():
                    for f in futures:
                        f.cancel()
                    return False
    return True


async def stream_answer(teacher: LocalTeacher, prompts: list, params: SamplingParams, seed: int | None,
                  answer: Answer, scored, head: dict, metrics: ModelMetrics):
    """Server-sent events, OpenAI's stream format: a chunk per token of each choice as the engine accepts it
    (with its log-probabilities when asked), a last chunk per choice with its finish reason, then ``[DONE]``.
    Prompt i samples with seed + i, as in one request. A client that goes away cancels the choices (the
    generator is closed: its ``finally``), and the engine drops their sequences."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:  # from the engine's thread
        loop.call_soon_threadsafe(events.put_nowait, item)

    def chunk(i: int, text: str, logprobs=None, reason=None) -> str:
        choice = {"text": text, "index": i, "logprobs": logprobs, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    futures = [scored] if scored is not None else []
    try:
        rows = await asyncio.wrap_future(scored) if scored is not None else [None] * len(prompts)
        if answer.req.echo:  # the prompt first (scored, when log-probabilities are asked)
            for i, p in enumerate(prompts):
                echoed = answer.choice(i, p, rows[i], Completion([], "", False))
                yield chunk(i, echoed["text"], echoed["logprobs"])
        if not params.max_new_tokens:
            for i in range(len(prompts)):
                yield chunk(i, "", reason="length")
            yield "data: [DONE]\n\n"
            return
        futures = [teacher.submit([p], params, None if seed is None else seed + i,
                                  on_token=lambda _, token, row, i=i: put((i, token, row)))
                   for i, p in enumerate(prompts)]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda f, i=i: put((i, None, f)))
        streams, first, done = [TokenStream(answer) for _ in prompts], True, 0
        while done < len(prompts):
            i, token, row = await events.get()
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
    finally:  # the client gone (the response cancelled), or every choice done: nothing left running
        for future in futures:
            future.cancel()
