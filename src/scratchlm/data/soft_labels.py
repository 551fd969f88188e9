"""A teacher's soft labels for a corpus, computed once (``scratchlm prepare --teacher SPEC --soft-labels K``)
into memory-mapped shards beside the corpus's token shards, as Gemma and Llama 3.2 precompute theirs: a
training run on the corpus reads them without a live teacher.

For every training token the teacher's top-k next-token distribution at it (raw log-probabilities, the top
ids), predicted from the tokens before it. The token stream (each token shard of the cache) is cut into pieces
of ``PIECE_TOKENS``; a piece is scored as one sequence, with the token before it as context, in windows of the
teacher's context (the first token of a window is predicted from the window before). A piece is the unit of
work: written to ``PIECE.ids.bin`` (uint16, k per token) and ``PIECE.logprobs.bin`` (float16), then marked
done (``PIECE.json``, last), so a killed build keeps its finished pieces and the next run scores only the
rest; a piece is scored alone in its process's teacher, so its bytes do not depend on what else ran. The very
first token of each shard has no row (its log-probabilities are -inf). Builds of one set are claimed with
``files.build_lock``, as the token cache's are.

Layout: ``CACHE/tokens/KEY/soft/NAME-kK/`` (NAME from the teacher spec), with ``meta.json`` (the teacher spec,
k, pieces, the seconds the teacher spent) written when every piece is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import atomic_file, atomic_write, build_lock
from .documents import DataError
from .token_cache import ShardedTokens, TokenizedCorpus

log = logging.getLogger("scratchlm.data")

PIECE_TOKENS = 2**18
"""Tokens scored as one unit of work (about 40 MB of soft labels at k = 20)."""
SOFT_FORMAT = 1
FAULT_PIECE_SLEEP_ENV = "SCRATCHLM_FAULT_PIECE_SLEEP"
"""Fault injection for tests: seconds to pause after each piece, so that a test can kill a build midway."""


def set_name(teacher: str, k: int) -> str:
    """The folder of a teacher's soft labels: a readable part of its spec, a hash of all of it, and k."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", teacher.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{readable}-{hashlib.blake2b(teacher.encode(), digest_size=4).hexdigest()}-k{k}"


@dataclass(frozen=True)
class _Piece:
    array: int  # which array of the corpus's train tokens (a non-empty shard)
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.array:06d}.{self.start // PIECE_TOKENS:05d}"


def _pieces(train: ShardedTokens) -> list[_Piece]:
    return [_Piece(a, start, min(start + PIECE_TOKENS, len(array))) for a, array in enumerate(train.arrays)
            for start in range(0, len(array), PIECE_TOKENS)]


_worker: dict = {}


def _start_worker(teacher: str, device: str, threads: int | None) -> None:
    """A scoring process: its own teacher, loaded once (and its share of the cores)."""
    import torch

    from ..teacher.backends import load_teacher

    if threads:
        torch.set_num_threads(threads)
    _worker["teacher"] = load_teacher(teacher, device=device)


def _score_piece(tokens: np.ndarray, piece: _Piece, k: int, out: Path, teacher=None) -> int:
    """Score one piece (with the token before it as context) and write its files; returns its tokens."""
    teacher = teacher or _worker["teacher"]
    started = time.perf_counter()
    first = max(piece.start - 1, 0)
    sequence = tokens[first : piece.stop].astype(np.int64).tolist()
    (rows,) = teacher.score([sequence], k)
    n = piece.stop - piece.start
    ids = np.zeros((n, k), np.uint16)
    logprobs = np.full((n, k), -np.inf, np.float16)
    at = 1 if piece.start == 0 else 0  # a shard's first token: nothing before it to predict it from
    ids[at:], logprobs[at:] = rows.ids, rows.logprobs
    for suffix, array in (("ids", ids), ("logprobs", logprobs)):
        with atomic_file(out / f"{piece.name}.{suffix}.bin", fsync=False) as tmp:
            array.tofile(tmp)
    done = {"tokens": n, "seconds": time.perf_counter() - started}
    atomic_write(out / f"{piece.name}.json", json.dumps(done), fsync=False)  # last: the piece is done
    if os.environ.get(FAULT_PIECE_SLEEP_ENV):
        time.sleep(float(os.environ[FAULT_PIECE_SLEEP_ENV]))
    return n


def _score_in_worker(array_path: str, piece: _Piece, k: int, out: str) -> int:
    tokens = np.memmap(array_path, dtype=np.uint16, mode="r")
    return _score_piece(tokens, piece, k, Path(out))


def build_soft_labels(corpus: TokenizedCorpus, teacher: str, k: int, num_proc: int = 1, device: str = "auto",
                      progress: bool = True, teacher_object=None) -> Path:
    """Score every training token of ``corpus`` with ``teacher`` (a spec) into soft-label shards; resumable.
    ``teacher_object``: an already loaded teacher to score with in this process (tests, notebooks)."""
    folder = corpus.folder / "soft" / set_name(teacher, k)
    pieces = _pieces(corpus.train)
    with build_lock(folder.with_name(folder.name + ".lock"), f"the soft labels of {teacher}"):
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "meta.json").exists():
            return folder
        todo = [p for p in pieces if not (folder / f"{p.name}.json").exists()]
        done_tokens = sum(p.stop - p.start for p in pieces if p not in todo)
        bar = tqdm(total=len(corpus.train), initial=done_tokens, unit="tok", unit_scale=True,
                   desc=f"soft labels (top {k}, {teacher})", disable=not progress or None)
        if num_proc <= 1 or len(todo) <= 1 or teacher_object is not None:
            if teacher_object is None:
                _start_worker(teacher, device, None)
            for p in todo:
                bar.update(_score_piece(corpus.train.arrays[p.array], p, k, folder, teacher_object))
        else:
            threads = max(1, (os.cpu_count() or 1) // num_proc)
            with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_start_worker, initargs=(teacher, device, threads)) as pool:
                paths = [a.filename for a in corpus.train.arrays]
                futures = [pool.submit(_score_in_worker, paths[p.array], p, k, str(folder)) for p in todo]
                for future in futures:
                    bar.update(future.result())
        bar.close()
        seconds = sum(json.loads((folder / f"{p.name}.json").read_text())["seconds"] for p in pieces)
        meta = {"format": SOFT_FORMAT, "teacher": teacher, "k": k, "tokens": len(corpus.train),
                "seconds": seconds, "pieces": [p.name for p in pieces]}
        atomic_write(folder / "meta.json", json.dumps(meta, indent=1))
    _worker.clear()
    return folder


class SoftLabelShards:
    """A corpus's soft labels, memory-mapped, addressed like its training tokens: ``rows(start, stop)``."""

    def __init__(self, folder: Path, train: ShardedTokens) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.k = self.meta["k"]
        pieces = _pieces(train)
        if self.meta["pieces"] != [p.name for p in pieces]:
            raise DataError(f"soft labels {folder} were made for another tokenization of this corpus: "
                            "prepare them again")
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
            start, done, i = start + take, done + take, i + 1


def open_soft_labels(corpus: TokenizedCorpus, k: int, teacher: str | None = None) -> SoftLabelShards:
    """The soft labels prepared for ``corpus`` with at least ``k`` entries per token: those of ``teacher``,
    or the only set there is."""
    root = corpus.folder / "soft"
    found = [f for f in sorted(root.glob("*-k*")) if (f / "meta.json").exists()] if root.is_dir() else []
    sets = {f: json.loads((f / "meta.json").read_text()) for f in found}
    usable = {f: m for f, m in sets.items() if m["k"] >= k and (teacher is None or m["teacher"] == teacher)}
    if not usable:
        have = ", ".join(f"{m['teacher']} (top {m['k']})" for m in sets.values()) or "none"
        raise DataError(f"no soft labels of top {k}{f' by {teacher}' if teacher else ''} for this corpus "
                        f"(prepared: {have}): run scratchlm prepare --data CORPUS --teacher SPEC "
                        f"--soft-labels {k}")
    if len(usable) > 1:
        raise DataError("several teachers' soft labels fit: choose one with --soft-label-teacher ("
                        + ", ".join(m["teacher"] for m in usable.values()) + ")")
    return SoftLabelShards(next(iter(usable)), corpus.train)
