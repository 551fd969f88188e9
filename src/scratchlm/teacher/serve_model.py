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

import time
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..config import Count, DeviceSpec, Port
from ..devices import pick_device
from ..serving import ServerConfig, harden
from .answers import MAX_PROMPTS, UNSUPPORTED, Answer, CompletionRequest, stream_answer, until_done
from .backends import Completion, LocalTeacher
from .model_metrics import ModelMetrics
from .sampling import SamplingParams

MAX_BODY_BYTES = 8 * 2**20
"""Largest request body serve-model takes by default."""
MAX_LOGPROBS = 20
"""Most alternatives a request may ask per token by default (vLLM's default too)."""


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
    max_body_bytes: Count = MAX_BODY_BYTES
    """Largest request body accepted (413 beyond it)."""
    max_logprobs: Count = MAX_LOGPROBS
    """Most alternatives a request may ask per token (logprobs, prompt_logprobs), as vLLM's --max-logprobs."""
    device: DeviceSpec = "auto"
    """auto, cpu, cuda or cuda:N."""
    compile: bool | None = None
    """Compile the decoding step before serving (torch.compile, 20-40 s at start on 2 cores; about 3x
    fewer milliseconds in the model at small widths). Default: on a CPU yes, on a GPU no."""


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


def model_id(model: str) -> str:
    """What /v1/models calls a model: its folder's name, never its local path (or the hub id as it is)."""
    local = Path(model).expanduser()
    return local.resolve().name if local.exists() else model


def create_app(teacher: LocalTeacher, model_name: str, api_key: str | None,
               max_body_bytes: int = MAX_BODY_BYTES, max_logprobs: int = MAX_LOGPROBS) -> FastAPI:
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
    async def completions(req: CompletionRequest, request: Request):
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
                events = stream_answer(teacher, prompts, params, req.seed, answer, scored, head, metrics)
                return StreamingResponse(events, media_type="text/event-stream")
            outs = teacher.submit(prompts, params, req.seed) if req.max_tokens else None
        except ValueError as err:  # e.g. more new tokens than the model's context leaves room for
            raise HTTPException(400, str(err)) from None
        if not await until_done([f for f in (scored, outs) if f is not None], request):
            return Response(status_code=499)  # nobody to answer: the client went away, its work was dropped
        done = outs.result() if outs is not None else [Completion([], "", False) for _ in prompts]
        rows = scored.result() if scored is not None else [None] * len(prompts)
        completion_tokens = sum(c.tokens for c in done)
        metrics.generated_tokens.inc(completion_tokens)
        prompt_tokens = sum(len(ids) for ids in prompts)
        choices = await run_in_threadpool(lambda: [answer.choice(i, p, r, c) for i, (p, r, c) in
                                                   enumerate(zip(prompts, rows, done, strict=True))])
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return harden(app, api_key, max_body_bytes, lambda status: metrics.requests.labels(str(status)).inc())


def serve_model(cfg: ServeModelConfig, background: bool = False):
    """serve-model with ``cfg``'s address and limits: in the foreground until interrupted, or (``background``)
    in a thread, returning the started ``BackgroundServer``."""
    from ..serving import BackgroundServer, run_server

    api_key = cfg.checked_key("model")
    device = pick_device(cfg.device)
    compile = cfg.compile if cfg.compile is not None else device.type == "cpu"
    teacher = LocalTeacher(cfg.model, device=str(device), batch_size=cfg.batch_size, compile=compile)
    app = create_app(teacher, cfg.served_model_name or model_id(cfg.model), api_key, cfg.max_body_bytes,
                     cfg.max_logprobs)
    if background:
        server = BackgroundServer(app, cfg, on_stop=teacher.close)
        server.teacher = teacher  # its engine's counters (a caller in the same process reads its cost)
        return server.start()
    run_server(app, cfg)
