"""``scratchlm serve``: the data-feed server (FastAPI + uvicorn).

Routes:
- ``GET /generate`` → JSON array of strings: the seed's contract, from the server's own stream.
- ``GET /v1/batch?size=N&cursor=C&rank=R&world_size=W`` → ``{"texts", "sources", "ids", "cursor"}``. Asking
  again from a cursor returns the same corpus texts; teacher texts are never replayed (they are fresh samples).
- ``GET /v1/heldout?size=N`` → the first N held-out documents (fixed; never in the training stream).
- ``GET /health`` (no key), ``GET /metrics`` (Prometheus), ``GET /docs`` and ``/openapi.json``.

Every route but ``/health`` needs ``Authorization: Bearer KEY`` when a key is set (compared in constant time).
A server bound to anything but loopback refuses to start without a key.
"""


import argparse
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..config import ConfigBase, ConfigError, add_arguments, load, overrides_from_args
from ..serving import API_KEY_ENV, check_bind, key_checker, read_api_key
from .corpus import CorpusSource, Cursor, CursorError

log = logging.getLogger("scratchlm.feed")

MAX_URL_BYTES = 4096


class ServeConfig(ConfigBase):
    """Settings of the feed server."""

    corpus: str | None = None
    """Corpus to serve: folder, .zip, .txt, .jsonl(.gz), .parquet (default: $SCRATCHLM_DATA)."""
    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback needs an API key."""
    port: int = 8000
    """TCP port."""
    api_key_file: str | None = None
    """File holding the API key (else $SCRATCHLM_API_KEY; never on the command line)."""
    batch_size: int = 16
    """Texts per /generate answer."""
    max_batch_size: int = 1024
    """Largest size a request may ask for."""
    seed: int = 1337
    """Seed of the corpus order."""
    chunk_chars: int = 8000
    """Documents longer than this are served in pieces cut at paragraph breaks."""
    eval_fraction: float = 0.005
    """Share of documents held out (served only by /v1/heldout)."""
    teacher: str | None = None
    """Teacher spec: local:PATH_OR_HUB_ID or openai:URL[#model] (none = corpus only)."""
    teacher_ratio: float = 0.0
    """Share of served texts that should come from the teacher, when one is attached."""
    teacher_api_key_file: str | None = None
    """API key file of an openai: teacher (else $SCRATCHLM_API_KEY)."""
    teacher_max_new_tokens: int = 256
    """Tokens the teacher writes per text."""
    teacher_temperature: float = 0.8
    """Teacher sampling temperature (0 = greedy)."""
    teacher_top_p: float = 0.95
    """Teacher nucleus sampling mass."""
    prompts: list[str] = ["words", "topic", "snippet"]
    """Prompt strategies for the teacher, mixed: token (the seed's), words, topic, snippet."""
    teacher_deadline_s: float = 0.05
    """How long a request waits for teacher texts before answering from the corpus instead."""
    teacher_buffer: int = 256
    """Teacher texts kept ready (bounded buffer)."""
    teacher_stall_s: float = 120.0
    """A teacher call running longer than this marks the teacher down (hung) until it answers."""
    public: bool = False
    """Open an ngrok tunnel (needs pyngrok and NGROK_AUTHTOKEN, and an API key)."""


class TeacherBuffer:
    """A bounded buffer of teacher texts, filled by a background producer thread.

    ``produce(n)`` is any callable returning up to n fresh texts (a local model, an OpenAI-compatible server...).
    If it raises, the teacher is marked down and retried with backoff; the feed goes on from the corpus.
    """

    def __init__(self, produce: Callable[[int], list[str]], capacity: int, chunk: int = 16,
                 stall_s: float = 120.0) -> None:
        self.produce, self.capacity, self.chunk, self.stall_s = produce, capacity, chunk, stall_s
        self.texts: deque[str] = deque()
        self.cond = threading.Condition()
        self.answering = True  # the last call returned texts
        self.busy_since: float | None = None
        self.generated = 0
        self.errors = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="scratchlm-teacher")
        self.thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            with self.cond:
                while len(self.texts) >= self.capacity and not self._stop.is_set():
                    self.cond.wait(0.5)
            self.busy_since = time.monotonic()
            try:
                new = self.produce(self.chunk)
            except Exception as err:  # the teacher's own failure: keep serving from the corpus
                self.busy_since = None
                self.errors += 1
                if self.answering:
                    log.warning("teacher down: %s", err)
                self.answering = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.busy_since = None
            if not self.up:
                log.info("teacher back")
            self.answering, backoff = True, 0.5
            with self.cond:
                self.texts.extend(t for t in new if t)
                self.generated += len(new)
                self.cond.notify_all()

    @property
    def up(self) -> bool:
        """Answering, and not stuck in a call for longer than ``stall_s`` (a hung teacher counts as down)."""
        busy = self.busy_since
        return self.answering and (busy is None or time.monotonic() - busy < self.stall_s)

    def take(self, n: int, deadline_s: float) -> list[str]:
        """Up to n buffered texts, waiting at most ``deadline_s`` for the first one."""
        with self.cond:
            if not self.texts:
                self.cond.wait(deadline_s)
            out = [self.texts.popleft() for _ in range(min(n, len(self.texts)))]
            self.cond.notify_all()
            return out

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the first texts are buffered (a cold teacher loads and warms up first); False on timeout."""
        with self.cond:
            return bool(self.cond.wait_for(lambda: self.texts or self._stop.is_set(), timeout_s) and self.texts)

    def stop(self) -> None:
        self._stop.set()
        with self.cond:
            self.cond.notify_all()


class Feed:
    """Corpus + optional teacher, mixed to a target ratio, with counters for /metrics."""

    def __init__(self, cfg: ServeConfig, corpus: CorpusSource, teacher: TeacherBuffer | None = None) -> None:
        self.cfg, self.corpus, self.teacher = cfg, corpus, teacher
        self.registry = CollectorRegistry()
        self.texts_served = Counter("scratchlm_texts_served", "Texts served", ["source"], registry=self.registry)
        self.bytes_served = Counter("scratchlm_bytes_served", "UTF-8 bytes of text served", ["source"],
                                    registry=self.registry)
        self.skipped = Gauge("scratchlm_corpus_files_skipped", "Corpus files skipped, by reason", ["reason"],
                             registry=self.registry)
        for reason, n in corpus.stats.skipped.items():
            self.skipped.labels(reason).set(n)
        Gauge("scratchlm_corpus_documents", "Training documents in the corpus", registry=self.registry).set(
            len(corpus.texts))
        depth = Gauge("scratchlm_buffer_depth", "Texts ready to serve, per source", ["source"], registry=self.registry)
        depth.labels("corpus").set_function(lambda: len(corpus.texts))  # in memory: always all of it
        depth.labels("teacher").set_function(lambda: len(teacher.texts) if teacher else 0)
        Gauge("scratchlm_teacher_texts_generated", "Texts the teacher has produced since start",
              registry=self.registry).set_function(lambda: teacher.generated if teacher else 0)
        self.teacher_stats = {"tokens": 0, "busy_s": 0.0}
        self.diversity = None
        Gauge("scratchlm_teacher_tokens", "Tokens the teacher has generated", registry=self.registry).set_function(
            lambda: self.teacher_stats["tokens"])
        Gauge("scratchlm_teacher_tokens_per_second", "Teacher tokens per second of generation",
              registry=self.registry).set_function(
            lambda: self.teacher_stats["tokens"] / self.teacher_stats["busy_s"] if self.teacher_stats["busy_s"] else 0)
        for key in ("exact_duplicate_rate", "near_duplicate_rate", "top_opening_share"):
            Gauge(f"scratchlm_teacher_{key}", f"Teacher texts: {key.replace('_', ' ')}",
                  registry=self.registry).set_function(lambda k=key: self.diversity.summary()[k] if self.diversity else 0)
        Gauge("scratchlm_teacher_up", "1 when the teacher answers", registry=self.registry).set_function(
            lambda: 1 if teacher and teacher.up else 0)
        Gauge("scratchlm_teacher_ratio_realised", "Share of served texts that came from the teacher",
              registry=self.registry).set_function(self.realised_ratio)
        self.errors = Counter("scratchlm_request_errors", "Requests answered with an error", ["status"],
                              registry=self.registry)
        self._served = {"corpus": 0, "teacher": 0}
        self._lock = threading.Lock()

    def realised_ratio(self) -> float:
        total = sum(self._served.values())
        return self._served["teacher"] / total if total else 0.0

    def _teacher_share(self, n: int) -> list[str]:
        if self.teacher is None or self.cfg.teacher_ratio <= 0:
            return []
        with self._lock:
            total = sum(self._served.values()) + n
            want = max(0, round(self.cfg.teacher_ratio * total) - self._served["teacher"])
        return self.teacher.take(min(want, n), self.cfg.teacher_deadline_s) if want else []

    def _count(self, source: str, texts: list[str]) -> None:
        with self._lock:
            self._served[source] += len(texts)
        self.texts_served.labels(source).inc(len(texts))
        self.bytes_served.labels(source).inc(sum(len(t.encode("utf-8")) for t in texts))

    def batch(self, n: int, cursor: Cursor | None, rank: int, world_size: int) -> dict:
        teacher_texts = self._teacher_share(n)
        n_corpus = n - len(teacher_texts)
        if cursor is None:
            indices, after = self.corpus.take_shared(n_corpus), None
        else:
            indices, after = self.corpus.take(cursor, n_corpus, rank, world_size)
        corpus_texts = [self.corpus.texts[i] for i in indices]
        self._count("corpus", corpus_texts)
        self._count("teacher", teacher_texts)
        # Teacher texts go last so that a batch's corpus part is the same on replay from its cursor.
        return {
            "texts": corpus_texts + teacher_texts,
            "sources": ["corpus"] * len(corpus_texts) + ["teacher"] * len(teacher_texts),
            "ids": [self.corpus.ids[i] for i in indices] + [f"teacher:{time.time_ns()}:{k}"
                                                              for k in range(len(teacher_texts))],
            "cursor": after.encode(self.corpus.fingerprint) if after else None,
        }


def create_app(cfg: ServeConfig, feed: Feed, api_key: str | None) -> FastAPI:
    authed = [Depends(key_checker(api_key))]
    app = FastAPI(title="scratchlm feed", docs_url=None, redoc_url=None, openapi_url=None,
                  description=__doc__)
    Size = Annotated[int, Query(ge=1, le=cfg.max_batch_size, description="number of texts")]

    @app.middleware("http")
    async def limits(request: Request, call_next):
        if len(str(request.url)) > MAX_URL_BYTES:
            return JSONResponse({"detail": f"URL longer than {MAX_URL_BYTES} bytes"}, status_code=414)
        response = await call_next(request)
        if response.status_code >= 400:
            feed.errors.labels(str(response.status_code)).inc()
        return response

    @app.get("/health")
    def health() -> dict:
        teacher = "none" if feed.teacher is None else ("up" if feed.teacher.up else "down")
        return {"status": "ok", "documents": len(feed.corpus.texts), "teacher": teacher}

    @app.get("/generate", dependencies=authed)
    def generate() -> list[str]:
        return feed.batch(cfg.batch_size, None, 0, 1)["texts"]

    @app.get("/v1/batch", dependencies=authed)
    def batch(size: Size = 16, cursor: Annotated[str | None, Query(max_length=200)] = None,
              rank: Annotated[int, Query(ge=0)] = 0, world_size: Annotated[int, Query(ge=1, le=65536)] = 1) -> dict:
        if rank >= world_size:
            raise HTTPException(status_code=422, detail=f"rank {rank} must be below world_size {world_size}")
        if world_size > len(feed.corpus.texts):
            raise HTTPException(status_code=422, detail=f"world_size {world_size} exceeds the corpus's "
                                                        f"{len(feed.corpus.texts)} documents")
        try:
            start = Cursor.decode(cursor, feed.corpus.fingerprint) if cursor else Cursor(0, 0)
        except CursorError as err:
            raise HTTPException(status_code=400, detail=str(err)) from None
        return feed.batch(size, start, rank, world_size)

    @app.get("/v1/heldout", dependencies=authed)
    def heldout(size: Size = 64) -> dict:
        return {"texts": feed.corpus.held_out[:size]}

    @app.get("/metrics", dependencies=authed)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(feed.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=authed, include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/docs", dependencies=authed, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="scratchlm feed")

    return app


def build(cfg: ServeConfig, teacher: Callable[[int], list[str]] | None = None) -> tuple[FastAPI, Feed]:
    """Check the settings, read the corpus and make the app (no socket yet)."""
    api_key = read_api_key(cfg.api_key_file)
    check_bind(cfg.host, api_key, "feed")
    if cfg.public and api_key is None:
        raise ConfigError(f"--public exposes the feed to the internet: set {API_KEY_ENV} or pass --api-key-file")
    corpus_path = cfg.corpus or os.environ.get("SCRATCHLM_DATA")
    if not corpus_path:
        raise ConfigError("no corpus: pass --corpus PATH or set SCRATCHLM_DATA")
    corpus = CorpusSource(corpus_path, cfg.seed, cfg.chunk_chars, cfg.eval_fraction)
    stats = {"tokens": 0, "busy_s": 0.0}
    meter = None
    if teacher is None and cfg.teacher:
        teacher, stats, meter = _teacher_producer(cfg, corpus)
    buffer = TeacherBuffer(teacher, cfg.teacher_buffer, stall_s=cfg.teacher_stall_s) if teacher is not None else None
    feed = Feed(cfg, corpus, buffer)
    feed.teacher_stats, feed.diversity = stats, meter
    log.info("corpus %s: %d documents (%d held out), files skipped: %s", corpus_path, len(corpus.texts),
             len(corpus.held_out), dict(corpus.stats.skipped) or "none")
    return create_app(cfg, feed, api_key), feed


def _teacher_producer(cfg: ServeConfig, corpus: CorpusSource):
    """produce(n) for the teacher buffer: diverse prompts → the teacher's backend → texts, with counters."""
    from ..teacher.backends import load_teacher
    from ..teacher.diversity import DiversityMeter
    from ..teacher.prompts import PromptSource
    from ..teacher.sampling import SamplingParams

    backend = load_teacher(cfg.teacher, cfg.teacher_api_key_file)
    decode = backend.tokenizer.decode if hasattr(backend, "tokenizer") else None
    strategies = [s for s in cfg.prompts if s != "token" or decode is not None]
    prompts = PromptSource(strategies, corpus.texts, seed=cfg.seed, decode=decode)
    params = SamplingParams(max_new_tokens=cfg.teacher_max_new_tokens, temperature=cfg.teacher_temperature,
                            top_p=cfg.teacher_top_p)
    stats = {"tokens": 0, "busy_s": 0.0}
    meter = DiversityMeter()

    def produce(n: int) -> list[str]:
        t0 = time.perf_counter()
        completions = backend.complete(prompts.sample(n), params)
        stats["busy_s"] += time.perf_counter() - t0
        stats["tokens"] += sum(c.tokens for c in completions)
        texts = [c.text.strip() for c in completions if c.text.strip()]
        for t in texts:
            meter.add(t)
        return texts

    log.info("teacher %s: %d%% of served texts, prompts %s", cfg.teacher, round(cfg.teacher_ratio * 100),
             ", ".join(strategies))
    return produce, stats, meter


def open_tunnel(port: int) -> str:
    """Open an ngrok tunnel to the port (pyngrok, NGROK_AUTHTOKEN) and return its public URL."""
    token = os.environ.get("NGROK_AUTHTOKEN")
    if not token:
        raise ConfigError("--public needs NGROK_AUTHTOKEN set to your ngrok auth token")
    try:
        from pyngrok import conf, ngrok
    except ImportError:
        raise ConfigError("--public needs pyngrok: pip install 'scratchlm[public]'") from None
    tunnel = ngrok.connect(port, pyngrok_config=conf.PyngrokConfig(auth_token=token))
    return tunnel.public_url


def serve_background(cfg: ServeConfig, teacher: Callable[[int], list[str]] | None = None):
    """Start the feed server in a background thread; returns the started ``BackgroundServer`` (``.url``,
    ``.stop()``, ``.feed``)."""
    from ..serving import BackgroundServer

    app, feed = build(cfg, teacher)
    server = BackgroundServer(app, cfg.host, cfg.port or None, on_stop=feed.teacher.stop if feed.teacher else None)
    server.feed = feed
    return server.start()


def spawn(corpus: str, port: int, *flags: str, timeout_s: float = 120.0):
    """Start ``scratchlm serve`` as its own process on loopback and return it once /health answers
    (for benchmarks and fault tests, which need a server they can kill)."""
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--corpus", str(corpus), "--port", str(port),
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"feed server on port {port} did not start")
        time.sleep(0.2)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app, _ = build(cfg)
    if cfg.public:
        print(f"Public URL: {open_tunnel(cfg.port)}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", h11_max_incomplete_event_size=16384)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve corpus texts over HTTP (the data feed)",
                       description="Serve the corpus (and teacher texts) over HTTP. Values: defaults < --config < flags.")
    p.add_argument("--config", help="YAML file of ServeConfig keys")
    add_arguments(p, ServeConfig)
    p.set_defaults(func=lambda args: serve(load(ServeConfig, args.config, overrides_from_args(args, ServeConfig))))
