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
        self._streams: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tokenizer digest → (tokens, offsets)
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
        tokenized with the feed's tokenizer once (``stream``)."""
        with self._lock:
            if window not in self._windowed:
                counts = np.diff(self._stream(tokenizer)[1])
                slots = np.repeat(np.arange(len(counts), dtype=np.int32), -(-counts // window))
                self._windowed[window] = slots, EpochOrder(len(slots), self.seed)
            return self._windowed[window][0]

    def window(self, doc: int, place: tuple[int, int], window: int, tokenizer: Tokenizer) -> list[int]:
        """``window`` tokens of the corpus stream from a place inside document ``doc`` seeded by its ``place``
        in the walk: a window that reaches the document's end runs on into the documents after it (and from
        the last one to the first), as a corpus block does."""
        tokens, offsets = self._stream(tokenizer)
        start = int(offsets[doc] + np.random.default_rng([self.seed, *place]).integers(0, offsets[doc + 1]
                                                                                        - offsets[doc]))
        pieces, need = [], window
        while need:
            piece = tokens[start : start + need]
            pieces.append(piece)
            need, start = need - len(piece), 0
        return np.concatenate(pieces).tolist()

    def _stream(self, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
        """The training documents' tokens end to end, each followed by <|endoftext|> (the stream a corpus
        loader reads), memory-mapped, and where each document starts in it (one offset more than documents).
        Tokenized once and kept beside the text store (about 12 s for a 47 MB corpus on 2 cores): a window is
        then a slice, with nothing tokenized per request."""
        if tokenizer.digest in self._streams:
            return self._streams[tokenizer.digest]
        ids_file = self.folder / f"train.stream-{tokenizer.digest}.npy"
        offsets_file = self.folder / f"train.offsets-{tokenizer.digest}.npy"  # written last: marks it whole
        stream = None
        try:
            tokens, offsets = np.load(ids_file, mmap_mode="r"), np.load(offsets_file)
            if len(offsets) == len(self.texts) + 1 and offsets[-1] == len(tokens):
                stream = tokens, offsets
        except (OSError, ValueError):  # missing, or cut short: tokenized again
            pass
        if stream is None:
            stream = self._tokenize_stream(tokenizer, ids_file, offsets_file)
        self._streams[tokenizer.digest] = stream
        return stream

    def _tokenize_stream(self, tokenizer: Tokenizer, ids_file: Path,
                         offsets_file: Path) -> tuple[np.ndarray, np.ndarray]:
        log.info("tokenizing %d documents for the feed's windows (once: kept beside the text store)",
                 len(self.texts))
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        parts = [tokenizer.encode_documents_with_lengths(self.texts[i : i + 512])
                 for i in range(0, len(self.texts), 512)]
        tokens = np.concatenate([ids for ids, _ in parts]).astype(dtype)
        offsets = np.concatenate([[0], np.cumsum(np.concatenate([n for _, n in parts]))]).astype(np.int64)
        try:
            for path, array in ((ids_file, tokens), (offsets_file, offsets)):
                buffer = io.BytesIO()
                np.save(buffer, array)
                atomic_write(path, buffer.getvalue())
        except OSError as err:  # a read-only cache: tokenized again at the next start
            log.warning("could not keep the feed's tokens beside the text store (%s)", err)
        return tokens, offsets

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
