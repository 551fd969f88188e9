"""Training from a feed server: an HTTP client that retries, and a loader that tokenizes and packs.

The loader's position is ``{"cursor", "leftover"}``: the cursor from which the next batch of texts is fetched,
and the tokens already fetched but not yet trained on. Saved in checkpoints, it resumes the stream exactly:
corpus texts from the cursor and the leftover tokens as they were (teacher texts among them included).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator

import httpx
import numpy as np

from ..serving import read_api_key
from ..tokenizer import Tokenizer
from .documents import DataError
from .loaders import Batch, block_span, prefetch

log = logging.getLogger("scratchlm.feed")


class FeedError(DataError):
    """The feed refused a request (4xx) or stayed unreachable longer than allowed."""


class FeedClient:
    """GET the feed's routes with the API key; retry connection errors and 5xx with backoff and jitter."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0,
                 max_wait_s: float = 600.0, backoff_s: float = 0.5, max_backoff_s: float = 15.0) -> None:
        self.url = url.rstrip("/")
        self.max_wait_s, self.backoff_s, self.max_backoff_s = max_wait_s, backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s)

    def get(self, path: str, **params) -> dict | list:
        delay, started = self.backoff_s, None
        while True:
            try:
                r = self.http.get(self.url + path, params={k: v for k, v in params.items() if v is not None})
                if r.status_code < 500:
                    break
                problem = f"HTTP {r.status_code}: {_detail(r)}"  # a strict feed's 503: its teachers lag
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            now = time.monotonic()
            if started is None:
                started = now
                log.warning("feed %s not answering (%s); waiting for it, retrying with backoff", self.url,
                            problem)
            if now - started > self.max_wait_s:
                raise FeedError(f"feed {self.url} not answering for {self.max_wait_s:.0f} s ({problem})")
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: replicas' clients do not retry in lockstep
            delay = min(delay * 2, self.max_backoff_s)
        if started is not None:
            log.info("feed %s is back after %.1f s; carrying on", self.url, time.monotonic() - started)
        if r.status_code >= 400:
            raise FeedError(f"feed {self.url}{path} answered {r.status_code}: {_detail(r)}")
        return r.json()

    def batch(self, size: int, cursor: str | None, rank: int = 0, world_size: int = 1) -> dict:
        return self.get("/v1/batch", size=size, cursor=cursor, rank=rank, world_size=world_size)

    def heldout(self, size: int) -> list[str]:
        return self.get("/v1/heldout", size=size)["texts"]

    def close(self) -> None:
        self.http.close()


def _detail(r: httpx.Response) -> str:
    """The message of an error reply."""
    try:
        return str(r.json().get("detail"))[:300]
    except (ValueError, AttributeError):
        return r.text[:200]


def client_from_env(url: str, api_key_file: str | None = None) -> FeedClient:
    """A client with the key from a file or $SCRATCHLM_API_KEY."""
    return FeedClient(url, read_api_key(api_key_file))


class FeedBlockLoader:
    """Batches of (inputs, targets) packed from feed texts: documents joined by <|endoftext|>, no padding.

    Requests are fetched and tokenized ``prefetch`` ahead in a background thread. Ranks ask the server for
    disjoint streams (``rank``/``world_size``).
    """

    KIND = "feed"

    def __init__(self, client: FeedClient, tokenizer: Tokenizer, block_size: int, batch_size: int,
                 position: dict | None = None, texts_per_request: int = 16, prefetch: int = 4, rank: int = 0,
                 world_size: int = 1) -> None:
        self.client, self.tokenizer = client, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.texts_per_request, self.prefetch = texts_per_request, prefetch
        self.rank, self.world_size = rank, world_size
        position = position or {}
        self.cursor: str | None = position.get("cursor")
        self.buffer = np.asarray(position.get("leftover", []), dtype=np.int64)
        # Which buffered tokens are a teacher's, saved as runs of (count, 0 or 1) (older positions: none).
        runs = position.get("leftover_teacher") or [[len(self.buffer), 0]]
        self.teacher = np.repeat([bool(t) for _, t in runs], [n for n, _ in runs])

    def _replies(self, cursor: str | None) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
        """(tokens, which of them are a teacher's, cursor after them) for each request, from ``cursor`` on."""
        while True:
            reply = self.client.batch(self.texts_per_request, cursor, self.rank, self.world_size)
            cursor = reply["cursor"]
            tokens, lengths = self.tokenizer.encode_documents_with_lengths(reply["texts"])
            teacher = np.repeat(np.array([s == "teacher" for s in reply["sources"]], dtype=bool), lengths)
            yield tokens, teacher, cursor

    def __iter__(self) -> Iterator[Batch]:
        # A short join: the fetching thread may be inside a request, and ends at its next check.
        replies = prefetch(self._replies(self.cursor), self.prefetch, join_timeout_s=1.0)
        span = block_span(self.block_size)
        need = self.batch_size * span
        try:
            while True:
                while len(self.buffer) < need:
                    tokens, teacher, self.cursor = next(replies)
                    self.buffer = np.concatenate([self.buffer, tokens])
                    self.teacher = np.concatenate([self.teacher, teacher])
                blocks = self.buffer[:need].reshape(self.batch_size, span)
                share = float(self.teacher[:need].mean())
                self.buffer, self.teacher = self.buffer[need:], self.teacher[need:]
                position = self.position()
                yield Batch.from_blocks(blocks, position, position["epoch"], teacher_share=share)
        finally:
            replies.close()

    def position(self) -> dict:
        epoch = int(self.cursor.split("-")[2]) if self.cursor else 0
        return {"kind": self.KIND, "cursor": self.cursor, "leftover": self.buffer.tolist(),
                "leftover_teacher": _runs(self.teacher), "epoch": epoch}


def _runs(mask: np.ndarray) -> list[list[int]]:
    """A boolean array as runs: [[count, 0 or 1], ...]."""
    if not len(mask):
        return []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(mask.astype(np.int8))) + 1, [len(mask)]])
    return [[int(b - a), int(mask[a])] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
