"""The corpus side of the feed: documents in a seeded order, addressable by a cursor.

Documents are written once to disk and read one at a time (``data.text_store``). Training order is
a per-epoch permutation seeded by ``seed``; a cursor names a place in that order, so any replica, asked from
the same cursor, returns the same texts. Held-out documents (``data.is_held_out``) are never in the stream;
they are served separately for evaluation.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from ..data import CorpusReading, open_text_store
from ..data.loaders import EpochOrder


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
        self.stats = store.stats
        self.seed = seed
        self.fingerprint = hashlib.blake2b(
            f"{seed}|{reading.chunk_chars}|{reading.eval_fraction}|{len(self.texts)}|"
            f"{store.meta['ids_digest']}".encode(),
            digest_size=4).hexdigest()
        self.order = EpochOrder(len(self.texts), seed)
        self.stream = Cursor(0, 0)
        """Where the server's own stream stands (``/generate``, and ``/v1/batch`` without a cursor); moved by
        the feed's mixer, under its lock."""

    def walk(self, cursor: Cursor, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, Cursor]]:
        """The documents for ``rank`` of ``world_size`` from ``cursor`` on: (index, the cursor after it), for
        as long as the caller takes them.

        Position ``index`` of an epoch's order goes to rank ``index % world_size``: ranks get disjoint
        streams.
        """
        if not 0 <= rank < world_size <= len(self.texts):
            raise ValueError(f"rank {rank} of world_size {world_size}: each rank needs at least one of the "
                             f"{len(self.texts)} documents")
        epoch, index = cursor.epoch, cursor.index
        while True:
            order = self.order(epoch)
            start = index + ((rank - index) % world_size)  # first position >= index that belongs to this rank
            if start >= len(order):  # this rank's share of the epoch is used up
                epoch, index = epoch + 1, 0
                continue
            index = start + world_size
            after = Cursor(epoch, index) if index < len(order) else Cursor(epoch + 1, 0)
            yield int(order[start]), after

    def take(self, cursor: Cursor, n: int, rank: int = 0, world_size: int = 1) -> tuple[list[int], Cursor]:
        """Indices of the next ``n`` documents for ``rank`` of ``world_size`` from ``cursor`` (``walk``), and
        the cursor after them."""
        taken = list(itertools.islice(self.walk(cursor, rank, world_size), n))
        return [index for index, _ in taken], taken[-1][1] if taken else cursor
