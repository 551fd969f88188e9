"""serve-model's Prometheus metrics: what a serving engine's operator watches (vLLM exports the same kinds):
requests, tokens in and out, tokens a second, the queue, how full the batch is, and the time to the first
token."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine import GenerationEngine

RATE_WINDOW_S = 10.0
"""The generation rate is over the last this many seconds."""


class ModelMetrics:
    """The counters of one served model, and gauges read from its engine when scraped."""

    def __init__(self, engine: GenerationEngine | None) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("scratchlm_model_requests", "Requests answered, by HTTP status", ["status"],
                                registry=registry)
        self.prompt_tokens = Counter("scratchlm_model_prompt_tokens", "Prompt tokens received",
                                     registry=registry)
        self.generated_tokens = Counter("scratchlm_model_generated_tokens", "Tokens generated",
                                        registry=registry)
        self.first_token = Histogram("scratchlm_model_time_to_first_token_seconds",
                                     "From a streamed request's arrival to its first generated token",
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                     registry=registry)
        self.engine = engine
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        engine_gauges = [
            ("queue_depth", "Sequences waiting for a place in the batch",
             lambda e: sum(len(r.waiting) for r in list(e._pending))),
            ("batch_occupancy", "Share of the batch's slots decoding a sequence",
             lambda e: sum(s is not None for s in e.slots) / e.batch_size),
            ("tokens_per_second", f"Tokens generated a second, over the last {RATE_WINDOW_S:.0f} s",
             lambda e: self._rate(e.stats.tokens)),
            ("busy_seconds", "Seconds the engine has spent in steps (scoring, prefilling, decoding) since it "
             "started: the teacher's cost, apart from its idle time", lambda e: e.stats.busy_s),
        ]
        for name, doc, value in engine_gauges:
            Gauge(f"scratchlm_model_{name}", doc, registry=registry).set_function(
                lambda value=value: value(self.engine) if self.engine is not None else 0.0)

    def _rate(self, tokens: int) -> float:
        """Tokens a second since the oldest sample of the window (a sample is taken at every scrape)."""
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, tokens))
            while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW_S:
                self._samples.popleft()
            (t0, n0) = self._samples[0]
            return (tokens - n0) / (now - t0) if now > t0 else 0.0
