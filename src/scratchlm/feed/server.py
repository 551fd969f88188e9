"""``scratchlm serve``: the data-feed server. Settings (``ServeConfig``), assembly (``build``), and running it
in the foreground (uvicorn), in the background (notebooks, the demo) or behind an ngrok tunnel."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from pydantic import field_validator

from ..config import (
    ConfigError,
    Count,
    Positive,
)
from ..data import corpus_from_env
from ..data.reading import CorpusReading
from ..serving import API_KEY_ENV, ServerConfig
from ..teacher.diversity import DiversityMeter
from ..teacher.prompts import PromptSource, PromptStrategy
from ..teacher.sampling import SamplingParams
from ..teacher.settings import TeacherSampling
from ..tokenizer import Tokenizer, load_tokenizer
from .app import create_app
from .corpus import CorpusSource
from .mixer import Feed
from .settings import CorpusScoring, FeedLimits, TeacherMixing
from .teachers import TeacherPool, TeacherWorker, TextPool, WorkerSettings

log = logging.getLogger("scratchlm.feed")


class ServeConfig(ServerConfig, CorpusReading, FeedLimits, TeacherSampling, TeacherMixing, CorpusScoring):
    """The data-feed server: corpus texts (and teacher texts) over HTTP."""

    corpus: str | None = None
    """Corpus to serve: folder, .zip, .txt, .jsonl(.gz/.zst), .parquet, hf:NAME[:CONFIG][@SPLIT] (default:
    $SCRATCHLM_DATA)."""
    seed: int = 1337
    """Seed of the corpus order."""
    teacher: list[str] = []
    """Teacher spec, local:PATH_OR_HUB_ID or openai:URL[#model]; give several (--teacher A --teacher B) to
    spread the work over several teachers (none = corpus only)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id, the trainer's (default: $SCRATCHLM_TOKENIZER, else microsoft/phi-2): counts
    tokens for the share and serves token ids."""
    teacher_api_key_file: str | None = None
    """API key file of openai: teachers (else $SCRATCHLM_API_KEY)."""
    teacher_concurrency: Count = 16
    """openai: requests in flight to each teacher server (× prompts per request = sequences in flight)."""
    teacher_prompts_per_request: Count = 4
    """Prompts per request to a teacher (a server that refuses lists, like llama.cpp's, is sent one)."""
    teacher_batch_size: Count | None = None
    """local: sequences decoded together (default: 256 on a GPU, 32 on a CPU)."""
    prompts: list[PromptStrategy] = ["words", "topic", "snippet"]
    """Prompt strategies for the teachers, mixed: token (the seed's), words, topic, snippet."""
    teacher_buffer: Count = 256
    """Teacher texts kept ready (a bounded pool shared by the teachers)."""
    teacher_stall_s: Positive = 120.0
    """A teacher request running longer than this marks the teacher down (hung) until it answers."""
    public: bool = False
    """Open an ngrok tunnel (needs pyngrok and NGROK_AUTHTOKEN, and an API key)."""

    @field_validator("teacher", mode="before")
    @classmethod
    def _one_or_several(cls, value):
        """A single spec (the seed's one teacher, a YAML string) is a list of one."""
        return [value] if isinstance(value, str) else ([] if value is None else value)


def _teachers(cfg: ServeConfig, corpus: CorpusSource, tokenizer: Tokenizer, extra=None,
              owned: bool = False) -> TeacherPool | None:
    """A worker per teacher (and ``extra``, a backend given as an object, closed with the feed if ``owned``),
    all filling one pool; their texts are tokenized with the feed's ``tokenizer`` as they arrive."""
    from ..teacher.backends import load_teacher

    backends = [load_teacher(spec, cfg.teacher_api_key_file, batch_size=cfg.teacher_batch_size,
                             concurrency=cfg.teacher_concurrency,
                             prompts_per_request=cfg.teacher_prompts_per_request, tokenizer=tokenizer)
                for spec in cfg.teacher] + ([extra] if extra is not None else [])
    if not backends:
        return None
    params = SamplingParams(**TeacherSampling.read(cfg).model_dump(), logprobs=cfg.soft_labels)
    texts, diversity = TextPool(cfg.teacher_buffer), DiversityMeter()
    workers = []
    for i, backend in enumerate(backends):
        # The 'token' prompts decode random ids with the feed's tokenizer: the teachers' (checked by
        # trainers).
        prompts = PromptSource(cfg.prompts, corpus.texts, seed=cfg.seed + i, decode=tokenizer.decode)
        strategies = prompts.strategies
        settings = WorkerSettings(params, backend.max_in_flight, backend.prompts_per_request,
                                  cfg.teacher_stall_s, diversity, tokenizer.encode_batch,
                                  generate=cfg.teacher_ratio > 0, vocab_size=tokenizer.vocab_size)
        owns = owned or backend is not extra
        workers.append(TeacherWorker(backend, prompts, settings, texts, owns_backend=owns))
        log.info("teacher %s: %d sequences in flight, %d prompts per request, prompts %s", workers[-1].name,
                 settings.in_flight, settings.per_request, ", ".join(strategies))
    log.info("teachers: %d%% of served %s, %s mode", round(cfg.teacher_ratio * 100), cfg.teacher_ratio_unit,
             cfg.teacher_mode)
    return TeacherPool(texts, workers, diversity)


def build(cfg: ServeConfig, teacher=None) -> tuple[FastAPI, Feed]:
    """Check the settings, read the corpus and make the app (no socket yet). ``teacher``, a teacher object or
    a function returning n fresh texts, joins the teachers ``cfg`` names (notebooks, tests)."""
    from ..teacher.backends import FunctionTeacher

    api_key = cfg.checked_key("feed")
    if cfg.public and api_key is None:
        raise ConfigError(f"--public exposes the feed to the internet: set {API_KEY_ENV} or pass "
                          "--api-key-file")
    corpus_path = corpus_from_env(cfg.corpus, "--corpus")
    if cfg.score_corpus and not cfg.soft_labels:
        raise ConfigError("--score-corpus keeps the teacher's top-k at corpus tokens: give --soft-labels K")
    if cfg.soft_labels and not cfg.teacher and teacher is None:
        raise ConfigError(f"--soft-labels {cfg.soft_labels} keeps a teacher's top-k: give --teacher (with "
                          "--score-corpus for corpus text); without one every row would be served unlabelled")
    tokenizer = load_tokenizer(cfg.tokenizer)
    corpus = CorpusSource(corpus_path, cfg.seed, cfg.part(CorpusReading))
    mix = TeacherMixing.read(cfg)
    if callable(teacher) and not hasattr(teacher, "submit"):  # a function: wrapped here, so closed here
        teachers = _teachers(cfg, corpus, tokenizer, FunctionTeacher(teacher), owned=True)
    else:
        teachers = _teachers(cfg, corpus, tokenizer, teacher)
    if cfg.score_corpus and teachers is None:
        raise ConfigError("--score-corpus needs a teacher to score with: give --teacher")
    feed = Feed(corpus, teachers, mix, tokenizer, cfg.part(CorpusScoring))
    log.info("corpus %s: %d documents (%d held out), files skipped: %s", corpus_path, len(corpus.texts),
             len(corpus.held_out), dict(corpus.stats.skipped) or "none")
    return create_app(feed, api_key, cfg.part(FeedLimits)), feed


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
    server = BackgroundServer(app, cfg, on_stop=feed.teachers.stop if feed.teachers else None)
    server.feed = feed
    return server.start()


def run_serve(cfg: ServeConfig) -> None:
    """The ``serve`` command: the feed in the foreground until interrupted."""
    from ..serving import run_server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app, _ = build(cfg)
    if cfg.public:
        print(f"Public URL: {open_tunnel(cfg.port)}", flush=True)
    run_server(app, cfg)
