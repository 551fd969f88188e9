"""``scratchlm serve``: the data-feed server. Settings (``ServeConfig``), assembly (``build``), and running it
in the foreground (uvicorn), in the background (notebooks, the demo) or behind an ngrok tunnel."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from ..config import ConfigError
from ..data import corpus_from_env
from ..serving import API_KEY_ENV, ServerConfig
from ..teacher.prompts import PromptStrategy
from .app import FeedLimits, create_app
from .corpus import CorpusSource
from .mixer import Feed, TeacherBuffer, TeacherProducer, TeacherStats

log = logging.getLogger("scratchlm.feed")


class ServeConfig(ServerConfig):
    """The data-feed server: corpus texts (and teacher texts) over HTTP."""

    corpus: str | None = None
    """Corpus to serve: folder, .zip, .txt, .jsonl(.gz), .parquet (default: $SCRATCHLM_DATA)."""
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
    prompts: list[PromptStrategy] = ["words", "topic", "snippet"]
    """Prompt strategies for the teacher, mixed: token (the seed's), words, topic, snippet."""
    teacher_deadline_s: float = 0.05
    """How long a request waits for teacher texts before answering from the corpus instead."""
    teacher_buffer: int = 256
    """Teacher texts kept ready (bounded buffer)."""
    teacher_stall_s: float = 120.0
    """A teacher call running longer than this marks the teacher down (hung) until it answers."""
    public: bool = False
    """Open an ngrok tunnel (needs pyngrok and NGROK_AUTHTOKEN, and an API key)."""



def _teacher(cfg: ServeConfig, corpus: CorpusSource) -> tuple[TeacherProducer, TeacherStats]:
    """The feed's teacher source: diverse prompts → the teacher's backend → texts, with counters."""
    from ..teacher.backends import load_teacher
    from ..teacher.prompts import PromptSource
    from ..teacher.sampling import SamplingParams

    backend = load_teacher(cfg.teacher, cfg.teacher_api_key_file)
    decode = backend.tokenizer.decode if hasattr(backend, "tokenizer") else None
    strategies = [s for s in cfg.prompts if s != "token" or decode is not None]
    prompts = PromptSource(strategies, corpus.texts, seed=cfg.seed, decode=decode)
    params = SamplingParams(max_new_tokens=cfg.teacher_max_new_tokens, temperature=cfg.teacher_temperature,
                            top_p=cfg.teacher_top_p)
    log.info("teacher %s: %d%% of served texts, prompts %s", cfg.teacher, round(cfg.teacher_ratio * 100),
             ", ".join(strategies))
    stats = TeacherStats()
    return TeacherProducer(backend, prompts, params, stats), stats


def build(cfg: ServeConfig, teacher=None) -> tuple[FastAPI, Feed]:
    """Check the settings, read the corpus and make the app (no socket yet). ``teacher``, a callable returning
    n fresh texts, stands in for ``cfg.teacher`` (tests)."""
    api_key = cfg.checked_key("feed")
    if cfg.public and api_key is None:
        raise ConfigError(f"--public exposes the feed to the internet: set {API_KEY_ENV} or pass "
                          "--api-key-file")
    corpus_path = corpus_from_env(cfg.corpus, "--corpus")
    corpus = CorpusSource(corpus_path, cfg.seed, cfg.chunk_chars, cfg.eval_fraction)
    stats = None
    if teacher is None and cfg.teacher:
        teacher, stats = _teacher(cfg, corpus)
    buffer = TeacherBuffer(teacher, cfg.teacher_buffer,
                           stall_s=cfg.teacher_stall_s) if teacher is not None else None
    feed = Feed(corpus, buffer, cfg.teacher_ratio, cfg.teacher_deadline_s, stats)
    log.info("corpus %s: %d documents (%d held out), files skipped: %s", corpus_path, len(corpus.texts),
             len(corpus.held_out), dict(corpus.stats.skipped) or "none")
    return create_app(feed, api_key, FeedLimits(cfg.batch_size, cfg.max_batch_size)), feed


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


def serve_background(cfg: ServeConfig, teacher=None):
    """Start the feed server in a background thread; returns the started ``BackgroundServer`` (``.url``,
    ``.stop()``, ``.feed``)."""
    from ..serving import BackgroundServer

    app, feed = build(cfg, teacher)
    server = BackgroundServer(app, cfg.host, cfg.port or None,
                              on_stop=feed.teacher.stop if feed.teacher else None)
    server.feed = feed
    return server.start()


def run_serve(cfg: ServeConfig) -> None:
    """The ``serve`` command: the feed in the foreground until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app, _ = build(cfg)
    if cfg.public:
        print(f"Public URL: {open_tunnel(cfg.port)}", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", h11_max_incomplete_event_size=16384)
