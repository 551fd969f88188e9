"""Real servers on loopback for the tests (and the feed benchmarks): the package's own BackgroundServer
(uvicorn in a thread), or ``scratchlm serve`` as a process of its own that a test can kill."""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
import sys
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scratchlm.serving import BackgroundServer, free_port

UvicornThread = BackgroundServer


def train_command(data, out, steps: int, **extra: str) -> list[str]:
    """``scratchlm train`` as a user types it: phi-tiny at toy size on the CPU, ``extra`` flags added
    (``checkpoint_interval="1"`` is ``--checkpoint-interval 1``)."""
    settings = {"model": "phi-tiny", "data": str(data), "out": str(out), "block-size": "64",
                "micro-batch-size": "4", "eval-batches": "1", "eval-fraction": "0.05",
                "max-steps": str(steps), "eval-interval": "1000", "device": "cpu",
                **{key.replace("_", "-"): value for key, value in extra.items()}}
    return [sys.executable, "-m", "scratchlm", "train",
            *[x for key, value in settings.items() for x in (f"--{key}", value)]]


def random_model_folder(folder, config, tokenizer):
    """A model folder (weights from seed 0 and Phi-2's tokenizer) for serve-model or a ``local:`` teacher: a
    real distribution over the real vocabulary, quick to compute."""
    import torch

    from scratchlm.model.hf import save_hf
    from scratchlm.model.model import Phi

    torch.manual_seed(0)
    save_hf(Phi(config), folder)
    tokenizer.save(folder)
    return folder


class FeedThread(BackgroundServer):
    """The real feed app, built from a ServeConfig, served on a loopback port; its teachers stop with it."""

    def __init__(self, cfg, teacher=None) -> None:
        from scratchlm.feed.server import build

        app, self.feed = build(cfg, teacher)
        super().__init__(app)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.feed.teachers:
            self.feed.teachers.stop()


def wait_until_healthy(proc: subprocess.Popen, port: int, timeout_s: float = 120.0) -> None:
    """Return once the server process on loopback ``port`` answers /health; kill it and raise if it exits
    or does not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.2)


def spawn(corpus: str, port: int, *flags: str, timeout_s: float = 120.0) -> subprocess.Popen:
    """Start ``scratchlm serve`` on loopback and return the process once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--corpus", str(corpus), "--port",
                             str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_healthy(proc, port, timeout_s)
    return proc


def slow_completions_app(seconds_per_token: float, one_prompt_only: bool = False):
    """A stand-in teacher written for the tests: an OpenAI-compatible completions server that sleeps
    ``seconds_per_token`` × max_tokens per request and answers numbered texts. With ``one_prompt_only`` it
    refuses a list of several prompts the way llama.cpp's server does (HTTP 500, empty message)."""
    app = FastAPI()
    counter = itertools.count()
    app.state.requests = []

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "slow-teacher", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        app.state.requests.append(len(prompts))
        if one_prompt_only and len(prompts) > 1:
            return JSONResponse({"error": {"message": "", "type": "server_error"}}, status_code=500)
        await asyncio.sleep(seconds_per_token * body["max_tokens"])
        words = " about the sea and the sky" * max(1, body["max_tokens"] // 6)  # about max_tokens tokens
        choices = [{"index": i, "text": f" teacher text {next(counter)}{words}",
                    "finish_reason": "length"} for i in range(len(prompts))]
        return {"choices": choices, "usage": {"completion_tokens": body["max_tokens"] * len(prompts)}}

    return app


__all__ = ["FeedThread", "UvicornThread", "free_port", "slow_completions_app", "spawn"]


class Records(logging.Handler):
    """scratchlm's log lines, whatever the logging set-up of earlier tests."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
