"""The corpus side of the feed: documents in a seeded order, addressable by a cursor.

Documents are written once to disk and read one at a time (``data.text_store``). Training order is
a per-epoch permutation seeded by ``seed``; a cursor names a place in that order, so any replica, asked from
the same cursor, returns the same texts. A client that reads windows of its block's span (``window``) walks
another order: each document once per window of its tokens (``slots``), so that it meets each document as
often as the corpus loader's blocks do. One window a document would weigh the corpus by documents, not
tokens (in the clean corpus wikipedia holds 45% of the documents and 37% of the tokens, code 14% and 17%),
and a feed run then trained on another mix than a corpus run (+0.05 nats at block 64). Held-out documents
(``data.is_held_out``) are never in the stream; they are served separately for evaluation.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import CorpusReading, open_text_store
from ..data.loaders import EpochOrder
from ..files import atomic_write
from ..tokenizer import Tokenizer

log = logging.getLogger("scratchlm.feed")


class CursorError(ValueError):
    """A cursor that this server did not issue (another corpus or seed) or that is malformed."""


@dataclass(frozen=True)
class Cursor:
    epoch: int
    index: int

    def encode(self, fingerprint: str) -> str:
        return f"v1-{fingerprint}-{self.epoch}-{self.index}"

    @staticmethod
    def decode(text: str, fingerprint: str) -> Cursor:
        parts = text.split("-")
        # ASCII digits only: str.isdigit also accepts "²" or "①", which int() refuses.
        if len(parts) != 4 or parts[0] != "v1" or not all(p.isascii() and p.isdigit() for p in parts[2:]):
            raise CursorError(f"malformed cursor {text[:80]!r}")
        if parts[1] != fingerprint:
            raise CursorError("cursor was issued for another corpus or seed")
        return Cursor(int(parts[2]), int(parts[3]))


class CorpusSource:
    """Training documents in a seeded, resumable order; held-out documents apart. The documents stay on disk
    (``data.text_store``): the server's memory does not grow with its corpus."""

    def __init__(self, path: str, seed: int, reading: CorpusReading) -> None:
        store = open_text_store(path, reading)
        self.texts, self.ids, self.held_out = store.train, store.ids, store.held_out
        self.folder: Path = store.folder
        self.stats = store.stats
        self.seed = seed
        self.fingerprint = hashlib.blake2b(
            f"{seed}|{reading.chunk_chars}|{reading.eval_fraction}|{len(self.texts)}|"
            f"{store.meta['ids_digest']}".encode(),
            digest_size=4).hexdigest()
        self.order = EpochOrder(len(self.texts), seed)
        self._windowed: dict[int, tuple[np.ndarray, EpochOrder]] = {}  # window → (slots, their order)
        self._lock = threading.Lock()
        self.stream = Cursor(0, 0)
        """Where the server's own stream stands (``/generate``, and ``/v1/batch`` without a cursor); moved by
        the feed's mixer, under its lock."""

    def fingerprint_for(self, window: int) -> str:
        """What a cursor of this corpus and seed carries: the walk over windows is another order."""
        return f"{self.fingerprint}w{window}" if window else self.fingerprint

    def slots(self, window: int, tokenizer: Tokenizer) -> np.ndarray:
        """Each document's index once per window of ``window`` tokens it holds (its <|endoftext|> counted),
        rounded up: a walk over them meets each document in proportion to its tokens. The documents are
        counted with the feed's tokenizer once, and the counts kept beside the text store."""
        with self._lock:
            if window not in self._windowed:
                counts = self._token_counts(tokenizer)
                slots = np.repeat(np.arange(len(counts), dtype=np.int32), -(-counts // window))
                self._windowed[window] = slots, EpochOrder(len(slots), self.seed)
            return self._windowed[window][0]

    def _token_counts(self, tokenizer: Tokenizer) -> np.ndarray:
        """Each training document's tokens and the <|endoftext|> after it."""
        cached = self.folder / f"train.tokens-{tokenizer.digest}.npy"
        if cached.exists():
            return np.load(cached)
        log.info("counting the tokens of %d documents (once: kept beside the text store)", len(self.texts))
        counts = 1 + np.concatenate([[len(ids) for ids in tokenizer.encode_batch(self.texts[i : i + 512])]
                                     for i in range(0, len(self.texts), 512)]).astype(np.int64)
        buffer = io.BytesIO()
        np.save(buffer, counts)
        try:
            atomic_write(cached, buffer.getvalue())
        except OSError as err:  # a read-only cache: counted again at the next start
            log.warning("could not keep the token counts beside the text store (%s)", err)
        return counts

    def walk(self, cursor: Cursor, rank: int = 0, world_size: int = 1,
             window: int = 0) -> Iterator[tuple[int, tuple[int, int], Cursor]]:
        """The documents for ``rank`` of ``world_size`` from ``cursor`` on: (index, its place (epoch,
        position), the cursor after it), for as long as the caller takes them; with ``window``, over the
        ``slots`` of that window (made first).

        Position ``index`` of an epoch's order goes to rank ``index % world_size``: ranks get disjoint
        streams.
        """
        if not 0 <= rank < world_size <= len(self.texts):
            raise ValueError(f"rank {rank} of world_size {world_size}: each rank needs at least one of the "
                             f"{len(self.texts)} documents")
        slots, order_of = self._windowed[window] if window else (None, self.order)
        epoch, index = cursor.epoch, cursor.index
        while True:
            order = order_of(epoch)
            start = index + ((rank - index) % world_size)  # first position >= index that belongs to this rank
            if start >= len(order):  # this rank's share of the epoch is used up
                epoch, index = epoch + 1, 0
                continue
            index = start + world_size
            after = Cursor(epoch, index) if index < len(order) else Cursor(epoch + 1, 0)
            at = int(order[start])
            yield (int(slots[at]) if slots is not None else at), (epoch, start), after

    def take(self, cursor: Cursor, n: int, rank: int = 0, world_size: int = 1) -> tuple[list[int], Cursor]:
        """Indices of the next ``n`` documents for ``rank`` of ``world_size`` from ``cursor`` (``walk``), and
        the cursor after them."""
        taken = list(itertools.islice(self.walk(cursor, rank, world_size), n))
        return [index for index, _, _ in taken], taken[-1][2] if taken else cursor
