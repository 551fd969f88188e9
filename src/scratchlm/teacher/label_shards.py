"""Soft-label shards built by a teacher (``scratchlm prepare --teacher SPEC --soft-labels K``): every
training token of a corpus scored once, piece by piece, resumably, into the layout ``data.soft_labels`` reads
(its module docstring has it). The teacher's side of it: a piece's rows are checked before they are written (a
broken teacher stops the build, naming the piece)."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import faults
from ..data.documents import DataError
from ..data.soft_labels import SOFT_FORMAT, Piece, damaged_pieces, log, pieces_of, set_name
from ..data.token_cache import TokenizedCorpus
from ..files import atomic_file, atomic_write, build_lock
from ..model.soft_labels import predicted_rows
from .protocol import topk_problem

_worker: dict = {}


def _start_worker(teacher: str, device: str, threads: int | None) -> None:
    """A scoring process: its own teacher, loaded once (and its share of the cores)."""
    import torch

    from .backends import load_teacher

    if threads:
        torch.set_num_threads(threads)
    _worker["teacher"] = load_teacher(teacher, device=device)


def _score_piece(tokens: np.ndarray, piece: Piece, k: int, out: Path, teacher=None,
                 vocab_size: int = 2**16) -> int:
    """Score one piece (with the token before it as context), check its rows and write its files; returns
    its tokens."""
    teacher = teacher or _worker["teacher"]
    started = time.perf_counter()
    first = max(piece.start - 1, 0)
    sequence = tokens[first : piece.stop].astype(np.int64).tolist()
    (rows,) = teacher.score([sequence], k)
    n = piece.stop - piece.start
    # With the token before it as context, a piece has a row at each of its tokens; a shard's very first
    # token has none (the piece read from it alone: its predicted rows).
    at = predicted_rows(n).start if piece.start == 0 else 0
    problem = topk_problem(rows, n - at, k, min(vocab_size, 2**16))
    if problem:
        raise DataError(f"soft labels: the teacher's scores of piece {piece.name} cannot be trained on "
                        f"({problem}); nothing of it was written")
    ids = np.zeros((n, k), np.uint16)
    logprobs = np.full((n, k), -np.inf, np.float16)
    ids[at:], logprobs[at:] = rows.ids, rows.logprobs
    done = {"tokens": n}
    for suffix, array in (("ids", ids), ("logprobs", logprobs)):
        with atomic_file(out / f"{piece.name}.{suffix}.bin", fsync=False) as tmp:
            array.tofile(tmp)
        done[f"{suffix}_crc32"] = zlib.crc32(array.tobytes())
    done["seconds"] = time.perf_counter() - started
    atomic_write(out / f"{piece.name}.json", json.dumps(done), fsync=False)  # last: the piece is done
    faults.pause("soft-label-piece")
    return n


def _score_in_worker(array_path: str, piece: Piece, k: int, out: str, vocab_size: int) -> int:
    tokens = np.memmap(array_path, dtype=np.uint16, mode="r")
    return _score_piece(tokens, piece, k, Path(out), vocab_size=vocab_size)


def build_soft_labels(corpus: TokenizedCorpus, teacher: str, k: int, num_proc: int = 1, device: str = "auto",
                      progress: bool = True, teacher_object=None, verify: bool = True,
                      vocab_size: int = 2**16) -> Path:
    """Score every training token of ``corpus`` with ``teacher`` (a spec) into soft-label shards; resumable.
    A finished set is checked (sizes; with ``verify``, checksums) and its damaged pieces scored again; an id
    at or beyond ``vocab_size`` (the tokenizer's) is a teacher's error.
    ``teacher_object``: an already loaded teacher to score with in this process (tests, notebooks)."""
    folder = corpus.folder / "soft" / set_name(teacher, k)
    pieces = pieces_of(corpus.train)
    with build_lock(folder.with_name(folder.name + ".lock"), f"the soft labels of {teacher}"):
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "meta.json").exists():
            damaged = damaged_pieces(folder, k, verify)
            if not damaged:
                return folder
            for name, why in damaged:
                log.warning("soft labels %s: piece %s is damaged (%s): scoring it again", folder, name, why)
                for suffix in (".json", ".ids.bin", ".logprobs.bin"):
                    (folder / f"{name}{suffix}").unlink(missing_ok=True)
            (folder / "meta.json").unlink()
        todo = [p for p in pieces if not (folder / f"{p.name}.json").exists()]
        done_tokens = sum(p.stop - p.start for p in pieces if p not in todo)
        bar = tqdm(total=len(corpus.train), initial=done_tokens, unit="tok", unit_scale=True,
                   desc=f"soft labels (top {k}, {teacher})", disable=not progress or None)
        if num_proc <= 1 or len(todo) <= 1 or teacher_object is not None:
            if teacher_object is None:
                _start_worker(teacher, device, None)
            for p in todo:
                bar.update(_score_piece(corpus.train.arrays[p.array], p, k, folder, teacher_object,
                                        vocab_size))
        else:
            threads = max(1, (os.cpu_count() or 1) // num_proc)
            with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_start_worker, initargs=(teacher, device, threads)) as pool:
                paths = [a.filename for a in corpus.train.arrays]
                futures = [pool.submit(_score_in_worker, paths[p.array], p, k, str(folder), vocab_size)
                           for p in todo]
                for future in futures:
                    bar.update(future.result())
        bar.close()
        seconds = sum(json.loads((folder / f"{p.name}.json").read_text())["seconds"] for p in pieces)
        meta = {"format": SOFT_FORMAT, "teacher": teacher, "k": k, "tokens": len(corpus.train),
                "seconds": seconds, "pieces": [p.name for p in pieces], "vocab_size": vocab_size}
        atomic_write(folder / "meta.json", json.dumps(meta, indent=1))
    _worker.clear()
    return folder


