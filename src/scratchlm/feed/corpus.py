"""The corpus side of the feed: documents in a seeded order, addressable by a cursor.

Documents are written once to disk and read one at a time (``data.text_store``). Training order is
a per-epoch permutation seeded by ``seed``; a cursor names a place in that order, so any replica, asked from
the same cursor, returns the same texts. Held-out documents (``data.is_held_out``) are never in the stream;
they are served separately for evaluation.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from ..data import EpochOrder, open_text_store


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

    def __init__(self, path: str, seed: int = 1337, chunk_chars: int = 8000, eval_fraction: float = 0.005,
                 text_field: str = "text") -> None:
        store = open_text_store(path, chunk_chars, eval_fraction, text_field)
        self.texts, self.ids, self.held_out = store.train, store.ids, store.held_out
        self.stats = store.stats
        self.seed = seed
        self.fingerprint = hashlib.blake2b(
            f"{seed}|{chunk_chars}|{eval_fraction}|{len(self.texts)}|{store.meta['ids_digest']}".encode(),
            digest_size=4).hexdigest()
        self.order = EpochOrder(len(self.texts), seed)
        self._stream = Cursor(0, 0)  # the shared stream behind the cursor-less /generate
        self._stream_lock = threading.Lock()

    def take(self, cursor: Cursor, n: int, rank: int = 0, world_size: int = 1) -> tuple[list[int], Cursor]:
        """Indices of the next ``n`` documents for ``rank`` of ``world_size`` from ``cursor``, and the cursor
        after.

        Position ``index`` of an epoch's order goes to rank ``index % world_size``: ranks get disjoint
        streams.
        """
        if not 0 <= rank < world_size <= len(self.texts):
            raise ValueError(f"rank {rank} of world_size {world_size}: each rank needs at least one of the "
                             f"{len(self.texts)} documents")
        epoch, index = cursor.epoch, cursor.index
        out: list[int] = []
        while len(out) < n:
            order = self.order(epoch)
            start = index + ((rank - index) % world_size)  # first position ≥ index that belongs to this rank
            picked = order[start::world_size][: n - len(out)]
            out.extend(int(i) for i in picked)
            index = start + len(picked) * world_size
            if index >= len(order):  # this rank's share of the epoch is used up
                epoch, index = epoch + 1, 0
        return out, Cursor(epoch, index)

    def take_shared(self, n: int) -> list[int]:
        """The next ``n`` documents of the server's own stream (the seed's ``/generate``); concurrent callers
        get consecutive, disjoint parts of it (read and advance under one lock)."""
        with self._stream_lock:
            picked, self._stream = self.take(self._stream, n)
        return picked
