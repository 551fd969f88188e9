"""Training from a feed server: an HTTP client that retries, and a loader that packs what it serves into
blocks and shuffles them.

The loader asks the feed for token ids (``/v1/batch?tokens=1``: the feed tokenizes, with the trainer's
tokenizer, checked at the start), cuts the stream into blocks of T+1 tokens as the corpus loader cuts a
corpus, and keeps ``shuffle_tokens`` of them in a ``ShuffleBuffer``: each batch is drawn at random from
blocks of many documents. Without it a batch was the continuation of one or two documents, step after step,
and trained measurably worse than the corpus loader on the same text (``bench/stream_fairness.py``). The
buffer is sized in tokens, not blocks: what it mixes is documents, and a fixed count of blocks held fewer of
them the smaller the block. It is filled before each draw (fill first, as ``datasets``' shuffle does: a draw
that took what had arrived by then would depend on timing, and a resumed run would not replay it), up to its
budget or to what the rest of the run still trains on, whichever is less: a teacher never writes text that no
step will read, and a short run is drawn from all of its data at once.

Its position (saved in checkpoints) is the cursor from which the next texts are fetched, the tokens fetched
but not yet cut into blocks, the buffer's blocks and its number of draws: a resumed run continues the stream
exactly, teacher texts already fetched included.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator

import httpx
import numpy as np
from pydantic import ValidationError

from ..model.soft_labels import SoftLabels
from ..serving import read_api_key
from .blocks import block_span
from .documents import DataError
from .feed_protocol import LOGPROB_SLACK, BatchQuery, FeedBatch, HeldOut, TokenBatch
from .loaders import Batch, ShuffleBuffer, prefetch
from .reading import FeedReading

log = logging.getLogger("scratchlm.feed")


class FeedError(DataError):
    """The feed refused a request (4xx) or stayed unreachable longer than allowed."""


class FeedClient:
    """GET the feed's routes with the API key; retry connection errors and 5xx with backoff and jitter."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 max_wait_s: float = 600.0, backoff_s: float = 0.5, max_backoff_s: float = 15.0) -> None:
        """``timeout_s``: how long an answer may take (a feed that scores its corpus answers when its teacher
        has: asking again sooner would only make it score twice)."""
        self.url = url.rstrip("/")
        self.max_wait_s, self.backoff_s, self.max_backoff_s = max_wait_s, backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s)

    def get(self, path: str, **params) -> httpx.Response:
        """The answer to GET ``path`` (2xx), after retrying through outages; a 4xx is a ``FeedError``."""
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
        return r

    def batch(self, size: int, cursor: str | None = None, rank: int = 0, world_size: int = 1,
              tokens: bool = False, soft_labels: int = 0, window: int = 0) -> FeedBatch | TokenBatch:
        """``/v1/batch``: texts (a ``FeedBatch``), or with ``tokens`` their token ids (a ``TokenBatch``), with
        ``soft_labels`` k the teacher's top-k beside them, with ``window`` each corpus text cut to one window
        of that many tokens."""
        tokens = tokens or soft_labels > 0 or window > 0
        try:
            query = BatchQuery(size=size, cursor=cursor, rank=rank, world_size=world_size, tokens=tokens,
                               soft_labels=soft_labels, window=window)
        except ValidationError as err:  # the contract is shared: refused here as the feed would refuse it
            raise FeedError(f"a request the feed would refuse (422): {err.errors()[0]['loc'][0]} "
                            f"{err.errors()[0]['msg']}") from None
        r = self.get("/v1/batch", **query.model_dump(exclude_defaults=True))
        return TokenBatch.from_bytes(r.content) if tokens else FeedBatch.model_validate_json(r.content)

    def heldout(self, size: int) -> list[str]:
        return HeldOut.model_validate_json(self.get("/v1/heldout", size=size).content).texts

    def health(self) -> dict:
        return self.get("/health").json()

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


COLUMNS = {"tokens": np.int32, "teacher": np.bool_}
"""What the loader keeps of each token of the stream: its id, and whether a teacher wrote it."""
SOFT_COLUMNS = {"soft_ids": np.uint16, "soft_logprobs": np.float16, "soft_mask": np.bool_}
"""... and, training on soft labels, the teacher's top-k there (as they travel: 2 + 2 bytes an entry)."""


class FeedBlockLoader:
    """Batches of (inputs, targets) drawn from a shuffle buffer of blocks cut from the feed's token stream
    (module docstring). Requests are fetched ``prefetch`` ahead in a background thread; ranks ask the server
    for disjoint streams (``rank``/``world_size``) and draw with their own seeds."""

    KIND = "feed"

    def __init__(self, client: FeedClient, block_size: int, batch_size: int, seed: int, feed: FeedReading,
                 top_k: int, position: dict | None = None, prefetch: int = 4, rank: int = 0,
                 world_size: int = 1, run_batches: int | None = None, vocab_size: int = 2**16) -> None:
        """``feed``: how the feed is read (request size, shuffle budget); ``top_k``: the soft labels read
        beside each token (0: none); ``run_batches``: the batches this rank draws over the whole run, when
        known (the buffer never holds more than the rest of them); ``vocab_size``: the tokenizer's ids (a
        reply with another is refused)."""
        self.client, self.block_size, self.batch_size = client, block_size, batch_size
        self.texts_per_request, self.prefetch = feed.feed_texts_per_request, prefetch
        self.rank, self.world_size = rank, world_size
        soft_labels, shuffle_tokens = top_k, feed.shuffle_budget(block_size)
        span = block_span(block_size)
        self.window = 0 if feed.feed_whole_documents else span
        self.buffer_blocks = max(batch_size, shuffle_tokens // span)
        """Blocks held before each draw (the budget in whole blocks, one batch at least)."""
        self.run_batches = run_batches
        self.soft_labels, self.vocab_size = soft_labels, min(vocab_size, 2**16)
        position = position or {}
        self.cursor: str | None = position.get("cursor")
        self.epoch: int = position.get("epoch", 0)
        self.columns = {**COLUMNS, **(SOFT_COLUMNS if soft_labels else {})}
        # A column's shape per token: () for the id and the masks, (k,) for the top-k.
        self.shapes = {k: (soft_labels,) if k in ("soft_ids", "soft_logprobs") else () for k in self.columns}
        self.pending = {k: np.asarray(position.get(f"pending_{k}", np.zeros((0, *shape))), dtype=t)
                        for (k, shape), t in zip(self.shapes.items(), self.columns.values(), strict=True)}
        saved = {k: np.asarray(position.get(f"buffer_{k}", np.zeros((0, span, *shape))), dtype=t)
                 for (k, shape), t in zip(self.shapes.items(), self.columns.values(), strict=True)}
        if saved["tokens"].shape[1:] != (span,):
            raise DataError(f"the saved feed position holds blocks of {saved['tokens'].shape[1]} tokens, "
                            f"this run's are {span}: resume with the same --block-size")
        self.buffer = ShuffleBuffer(saved, seed, rank, position.get("draws", 0))

    def _replies(self, cursor: str | None) -> Iterator[TokenBatch]:
        """The feed's answers from ``cursor`` on, as token ids (and soft labels)."""
        while True:
            reply = self.client.batch(self.texts_per_request, cursor, self.rank, self.world_size, tokens=True,
                                      soft_labels=self.soft_labels, window=self.window)
            cursor = reply.meta.cursor
            yield reply

    def _cut(self, reply: TokenBatch) -> None:
        """Add a reply's tokens to the stream and move its whole blocks into the buffer."""
        for name, ids in (("token", reply.token_ids), ("soft-label", reply.soft_ids)):
            if ids is not None and ids.size and int(ids.max()) >= self.vocab_size:
                raise FeedError(f"the feed at {self.client.url} sent {name} id {int(ids.max())}, outside the "
                                f"tokenizer's {self.vocab_size} ids: it passed on a teacher's answer "
                                "unchecked")
        if reply.soft_logprobs is not None:
            rows = reply.soft_logprobs[reply.soft_mask]
            if np.isnan(rows).any() or (rows > LOGPROB_SLACK).any():
                raise FeedError(f"the feed at {self.client.url} sent NaN or positive soft-label "
                                "log-probabilities: it passed on a teacher's answer unchecked")
        span = block_span(self.block_size)
        stream = {"tokens": reply.token_ids, "teacher": reply.teacher_mask(), "soft_ids": reply.soft_ids,
                  "soft_logprobs": reply.soft_logprobs, "soft_mask": reply.soft_mask}
        joined = {k: np.concatenate([self.pending[k], stream[k].astype(t)]) for k, t in self.columns.items()}
        whole = len(joined["tokens"]) // span * span
        self.buffer.add({k: v[:whole].reshape(-1, span, *self.shapes[k]) for k, v in joined.items()})
        self.pending = {k: v[whole:] for k, v in joined.items()}

    def __iter__(self) -> Iterator[Batch]:
        # A short join: the fetching thread may be inside a request, and ends at its next check.
        replies = prefetch(self._replies(self.cursor), self.prefetch, join_timeout_s=1.0)
        shuffle = self.buffer_blocks > self.batch_size
        try:
            while True:
                while len(self.buffer) < self.held_blocks():
                    reply = next(replies)
                    self.cursor, self.epoch = reply.meta.cursor, reply.meta.epoch
                    self._cut(reply)
                rows = self.buffer.draw(self.batch_size, shuffle)
                position = self.position()
                soft = (SoftLabels.of_blocks(rows["soft_ids"], rows["soft_logprobs"], rows["soft_mask"])
                        if self.soft_labels else None)
                yield Batch.from_blocks(rows["tokens"], position, position["epoch"], rows["teacher"], soft)
        finally:
            replies.close()

    def held_blocks(self) -> int:
        """Blocks the buffer holds before the next draw: its budget, or what the rest of the run draws if that
        is less (at least one batch). A function of the draws so far, so a resumed run fills as it did."""
        if self.run_batches is None:
            return self.buffer_blocks
        left = (self.run_batches - self.buffer.draws) * self.batch_size
        return max(self.batch_size, min(self.buffer_blocks, left))

    def position(self) -> dict:
        """Where the stream stands (its arrays are never changed in place, so they are not copied)."""
        return {"kind": self.KIND, "cursor": self.cursor, "epoch": self.epoch, "draws": self.buffer.draws,
                **{f"pending_{k}": v for k, v in self.pending.items()},
                **{f"buffer_{k}": v for k, v in self.buffer.columns.items()}}
