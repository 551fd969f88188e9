"""A teacher's soft labels for a corpus, computed once (``scratchlm prepare --teacher SPEC --soft-labels K``)
into memory-mapped shards beside the corpus's token shards, as Gemma and Llama 3.2 precompute theirs: a
training run on the corpus reads them without a live teacher.

For every training token the teacher's top-k next-token distribution at it (raw log-probabilities, the top
ids), predicted from the tokens before it. The token stream (each token shard of the cache) is cut into pieces
of ``PIECE_TOKENS``; a piece is scored as one sequence, with the token before it as context, in windows of the
teacher's context (the first token of a window is predicted from the window before). A piece is the unit of
work: its rows checked (ids inside the vocabulary, log-probabilities neither NaN nor positive: a broken
teacher stops the build naming the piece), written to ``PIECE.ids.bin`` (uint16, k per token) and
``PIECE.logprobs.bin`` (float16), then marked done (``PIECE.json``, last, with the files' checksums), so a
killed build keeps its finished pieces and the next run scores only the rest; a piece is scored alone in its
process's teacher, so its bytes do not depend on what else ran. The very first token of each shard has no row
(its log-probabilities are -inf). Builds of one set are claimed with ``files.build_lock``, as the token
cache's are.

As token shards are, the pieces are checked: their sizes at every open, their checksums with
``--verify-cache``, and the values a batch reads as it reads them. ``prepare`` scores a damaged piece again;
a training run names it and stops.

Layout: ``CACHE/tokens/KEY/soft/NAME-kK/`` (NAME from the teacher spec), with ``meta.json`` (the teacher spec,
k, pieces, the seconds the teacher spent) written when every piece is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import file_crc32
from .documents import DataError
from .feed_protocol import LOGPROB_SLACK
from .token_cache import ShardedTokens, TokenizedCorpus

log = logging.getLogger("scratchlm.data")

PIECE_TOKENS = 2**18
"""Tokens scored as one unit of work (about 40 MB of soft labels at k = 20)."""
SOFT_FORMAT = 1


def set_name(teacher: str, k: int) -> str:
    """The folder of a teacher's soft labels: a readable part of its spec, a hash of all of it, and k."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", teacher.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{readable}-{hashlib.blake2b(teacher.encode(), digest_size=4).hexdigest()}-k{k}"


@dataclass(frozen=True)
class Piece:
    array: int  # which array of the corpus's train tokens (a non-empty shard)
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.array:06d}.{self.start // PIECE_TOKENS:05d}"


def pieces_of(train: ShardedTokens) -> list[Piece]:
    """The units of work of a corpus's training tokens: each shard cut into pieces of ``PIECE_TOKENS``."""
    return [Piece(a, start, min(start + PIECE_TOKENS, len(array))) for a, array in enumerate(train.arrays)
            for start in range(0, len(array), PIECE_TOKENS)]


def damaged_pieces(folder: Path, k: int, checksums: bool = False) -> list[tuple[str, str]]:
    """(piece, what is wrong) for each piece of a finished set whose files are missing or of another size than
    its tokens give (cheap: every open), or, with ``checksums``, whose bytes differ from what was written (a
    full read)."""
    meta = json.loads((folder / "meta.json").read_text())
    damaged = []
    for name in meta["pieces"]:
        try:
            done = json.loads((folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            damaged.append((name, f"{name}.json missing or unreadable"))
            continue
        for suffix in ("ids", "logprobs"):
            path = folder / f"{name}.{suffix}.bin"
            size = path.stat().st_size if path.exists() else None
            if size != 2 * k * done["tokens"]:
                damaged.append((name, f"{path.name} holds {size} bytes, its {done['tokens']} tokens take "
                                      f"{2 * k * done['tokens']}"))
            elif checksums and f"{suffix}_crc32" in done and file_crc32(path) != done[f"{suffix}_crc32"]:
                damaged.append((name, f"{path.name} differs from its checksum"))
    return damaged



class SoftLabelShards:
    """A corpus's soft labels, memory-mapped, addressed like its training tokens: ``rows(start, stop)``.
    Opening checks every piece's size (and, with ``verify``, its checksum); a damaged one is named."""

    def __init__(self, folder: Path, train: ShardedTokens, verify: bool = False) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.k = self.meta["k"]
        pieces = pieces_of(train)
        if self.meta["pieces"] != [p.name for p in pieces]:
            raise DataError(f"soft labels {folder} were made for another tokenization of this corpus: "
                            "prepare them again")
        damaged = damaged_pieces(folder, self.k, verify)
        if damaged:
            raise DataError(f"soft labels {folder}: " + "; ".join(f"piece {n}: {why}" for n, why in damaged)
                            + f". Run scratchlm prepare --data CORPUS --teacher {self.meta['teacher']} "
                            f"--soft-labels {self.k} to score the damaged pieces again")
        self.names = [p.name for p in pieces]
        self.vocab_size = self.meta.get("vocab_size", 2**16)
        # plain arrays over the maps: np.memmap's own slicing costs more than the copy of a block's rows
        self.ids = [np.asarray(np.memmap(folder / f"{p.name}.ids.bin", dtype=np.uint16, mode="r"))
                    .reshape(-1, self.k) for p in pieces]
        self.logprobs = [np.asarray(np.memmap(folder / f"{p.name}.logprobs.bin", dtype=np.float16, mode="r"))
                         .reshape(-1, self.k) for p in pieces]
        self.starts = np.cumsum([0] + [p.stop - p.start for p in pieces]).tolist()

    def rows(self, start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, log-probabilities, mask) of training tokens start..stop, the first k of each row."""
        ids, logprobs = np.empty((stop - start, k), np.uint16), np.empty((stop - start, k), np.float16)
        self.read_into(start, ids, logprobs)
        return ids, logprobs, np.isfinite(logprobs[:, 0])

    def read_into(self, start: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Fill ``ids`` and ``logprobs`` (n, k) with the rows of training tokens start..start + n, copied once
        from the shards (a loader's batch is written in place, not concatenated and stacked)."""
        n, k = ids.shape
        stop, done = start + n, 0
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            take = min(stop, self.starts[i + 1]) - start
            at = start - self.starts[i]
            ids[done : done + take] = self.ids[i][at : at + take, :k]
            logprobs[done : done + take] = self.logprobs[i][at : at + take, :k]
            read = logprobs[done : done + take]  # as written: -inf, or finite and at most 0
            if (np.isnan(read).any() or (read > LOGPROB_SLACK).any()
                    or int(ids[done : done + take].max(initial=0)) >= self.vocab_size):
                raise DataError(f"soft labels {self.folder}: piece {self.names[i]} holds NaN or positive "
                                f"log-probabilities, or ids beyond the vocabulary, at training tokens "
                                f"{start:,}..{start + take:,}: damaged after it was written. Run scratchlm "
                                "prepare again (it checks every piece's checksum) to score it again")
            start, done, i = start + take, done + take, i + 1


def open_soft_labels(corpus: TokenizedCorpus, k: int, teacher: str | None = None,
                     verify: bool = False) -> SoftLabelShards:
    """The soft labels prepared for ``corpus`` with at least ``k`` entries per token: those of ``teacher``,
    or the only set there is; checked as ``SoftLabelShards`` opens them."""
    root = corpus.folder / "soft"
    found = [f for f in sorted(root.glob("*-k*")) if (f / "meta.json").exists()] if root.is_dir() else []
    sets = {f: json.loads((f / "meta.json").read_text()) for f in found}
    usable = {f: m for f, m in sets.items() if m["k"] >= k and (teacher is None or m["teacher"] == teacher)}
    if not usable:
        have = ", ".join(f"{m['teacher']} (top {m['k']})" for m in sets.values()) or "none"
        raise DataError(f"no soft labels of top {k}{f' by {teacher}' if teacher else ''} for this corpus "
                        f"(prepared: {have}): run scratchlm prepare --data CORPUS --teacher SPEC "
                        f"--soft-labels {k}")
    teachers = {m["teacher"] for m in usable.values()}
    if len(teachers) > 1:
        raise DataError("several teachers' soft labels fit: choose one with --soft-label-teacher ("
                        + ", ".join(sorted(teachers)) + ")")
    # one teacher's sets of several k: the smallest that holds the k asked for reads the fewest bytes
    folder = min(usable, key=lambda f: usable[f]["k"])
    return SoftLabelShards(folder, corpus.train, verify)
