"""``scratchlm serve-model``: an OpenAI-compatible completions subset for a Phi checkpoint.

``POST /v1/completions`` (prompt: a string, a list, or token ids; max_tokens, temperature, top_p, top_k, n,
seed, stop, stream) and ``GET /v1/models``, authenticated like the feed server (the key is checked before a
request body is read, and bodies are capped), so a teacher can run on its own GPU machine and
several can serve one feed. Every request's prompts join the one running batch of the model's generation
engine, whatever other requests are in flight.
"""

import json
import time
import uuid
from concurrent.futures import as_completed
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..serving import harden
from .backends import Completion, LocalTeacher
from .commands import ServeModelConfig
from .sampling import SamplingParams

MAX_PROMPTS = 1024
UNSUPPORTED = {"logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}
"""OpenAI fields this server does not implement, with the values that ask for nothing (accepted)."""

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(BaseModel):
    """The completions request, as OpenAI defines it; fields we do not implement are refused by name."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extras: checked against UNSUPPORTED

    model: str | None = None
    prompt: Annotated[Prompt, Field(description="a prompt, prompts, or token ids (one list or several)")]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    n: int = Field(1, ge=1, le=64)
    best_of: int | None = Field(None, ge=1, le=64)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False

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


def _refuse_unsupported(req: CompletionRequest) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise HTTPException(400, f"'{name}' is not supported by this server (scratchlm serve-model)")
    if req.best_of is not None and req.best_of != req.n:
        raise HTTPException(400, "'best_of' other than n is not supported by this server")


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


def _choice(i: int, c: Completion, stops: list[str]) -> dict:
    text, reason = c.text, "stop" if c.finished else "length"
    for s in stops:
        if s and s in text:
            text, reason = text[: text.index(s)], "stop"
    return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}


def model_id(model: str) -> str:
    """What /v1/models calls a model: its folder's name, never its local path (or the hub id as it is)."""
    local = Path(model).expanduser()
    return local.resolve().name if local.exists() else model


def create_app(teacher: LocalTeacher, model_name: str, api_key: str | None,
               max_body_bytes: int = 8 * 2**20) -> FastAPI:
    app = FastAPI(title="scratchlm serve-model", description=__doc__)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "scratchlm",
                                            "max_model_len": teacher.context_length}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        _refuse_unsupported(req)
        prompts = _fitting(teacher, teacher.token_ids(_prompt_list(req, teacher.tokenizer.vocab_size)),
                           req.max_tokens)
        params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p if req.top_p < 1.0 else None, top_k=req.top_k)
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        try:
            teacher.check(params)
            if req.stream:
                return StreamingResponse(_stream(teacher, prompts, params, req.seed, stops, head),
                                         media_type="text/event-stream")
            outs = teacher.submit(prompts, params, req.seed).result()
        except ValueError as err:  # e.g. more new tokens than the model's context leaves room for
            raise HTTPException(400, str(err)) from None
        completion_tokens = sum(c.tokens for c in outs)
        prompt_tokens = sum(len(ids) for ids in prompts)
        return {**head, "choices": [_choice(i, c, stops) for i, c in enumerate(outs)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return harden(app, api_key, max_body_bytes)


def _stream(teacher: LocalTeacher, prompts: list, params: SamplingParams, seed: int | None, stops: list[str],
            head: dict):
    """Server-sent events: each choice as soon as it is finished, then ``[DONE]`` (OpenAI's stream format).
    Prompt i samples with seed + i, as in one request."""
    futures = {teacher.submit([p], params, None if seed is None else seed + i): i
               for i, p in enumerate(prompts)}
    for future in as_completed(futures):
        choice = _choice(futures[future], future.result()[0], stops)
        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"


def serve_model(cfg: ServeModelConfig, background: bool = False):
    """serve-model with ``cfg``'s address and limits: in the foreground until interrupted, or (``background``)
    in a thread, returning the started ``BackgroundServer``."""
    from ..serving import BackgroundServer, run_server

    api_key = cfg.checked_key("model")
    teacher = LocalTeacher(cfg.model, device=cfg.device, batch_size=cfg.batch_size)
    app = create_app(teacher, cfg.served_model_name or model_id(cfg.model), api_key, cfg.max_body_bytes)
    if background:
        return BackgroundServer(app, cfg, on_stop=teacher.close).start()
    run_server(app, cfg)
