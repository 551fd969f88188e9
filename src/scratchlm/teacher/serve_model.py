"""``scratchlm serve-model``: an OpenAI-compatible completions subset for a Phi checkpoint.

``POST /v1/completions`` (prompt: a string or a list; max_tokens, temperature, top_p, top_k, n, seed, stop)
and ``GET /v1/models``, authenticated like the feed server, so a teacher can run on its own GPU machine and
several can serve one feed. Every request's prompts join the one running batch of the model's generation
engine, whatever other requests are in flight.
"""

import time
import uuid
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..serving import require_key
from .backends import LocalTeacher
from .commands import ServeModelConfig
from .sampling import SamplingParams

MAX_PROMPTS = 1024


class CompletionRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, logit_bias...)
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Annotated[str | list[str], Field(description="one prompt or a list")]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None


def create_app(teacher: LocalTeacher, model_name: str, api_key: str | None) -> FastAPI:
    app = FastAPI(title="scratchlm serve-model", description=__doc__)
    app.state.api_key = api_key
    authed = [Depends(require_key)]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=authed)
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "scratchlm"}]}

    @app.post("/v1/completions", dependencies=authed)
    def completions(req: CompletionRequest) -> dict:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [p for p in prompts for _ in range(req.n)]
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise HTTPException(422, f"between 1 and {MAX_PROMPTS} prompts × n per request")
        params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p if req.top_p < 1.0 else None, top_k=req.top_k)
        outs = teacher.complete(prompts, params, req.seed)
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        choices = []
        for i, c in enumerate(outs):
            text, reason = c.text, "stop" if c.finished else "length"
            for s in stops:
                if s and s in text:
                    text, reason = text[: text.index(s)], "stop"
            choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": reason})
        completion_tokens = sum(c.tokens for c in outs)
        prompt_tokens = sum(len(ids) for ids in teacher.tokenizer.encode_batch(prompts))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def serve_model(cfg: ServeModelConfig) -> None:
    import uvicorn

    api_key = cfg.checked_key("model")
    teacher = LocalTeacher(cfg.model, device=cfg.device, batch_size=cfg.batch_size)
    uvicorn.run(create_app(teacher, cfg.model, api_key), host=cfg.host, port=cfg.port, log_level="info")
