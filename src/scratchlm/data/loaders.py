"""Training batches from token arrays: blocks of T+1 tokens, seeded per-epoch orders, exact resume, mixes.

A training sequence of T tokens needs T+1 of them (each input token's target is the next one), so a token
array is cut into consecutive blocks of ``block_span(T)`` tokens with no padding (``TokenBlocks``).
``BlockLoader`` visits them in a seeded permutation per epoch; its position ``(epoch, index)`` resumes the
stream exactly. ``MixedBlockLoader`` draws from several arrays in fixed proportions. Each batch carries the
stream position after it, tagged with the loader's kind, so a checkpoint knows what it is resuming.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..model.soft_labels import SoftLabels, predicted_rows
from .blocks import block_span
from .documents import DataError

T = TypeVar("T")


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): inputs shifted by one
    position: dict  # the stream position after this batch (tagged with "kind"; may hold numpy arrays)
    epoch: int = 0  # passes over the data so far (for logs)
    teacher_mask: torch.Tensor | None = None  # (B, T) bool: which targets a teacher wrote (from a feed)
    soft: SoftLabels | None = None  # the teacher's top-k at the targets, when the data carries them

    @property
    def teacher_share(self) -> float | None:
        """Share of the batch's targets that a teacher wrote (None when the data has no teachers)."""
        return None if self.teacher_mask is None else float(self.teacher_mask.float().mean())

    @staticmethod
    def from_blocks(blocks: np.ndarray, position: dict, epoch: int = 0, teacher: np.ndarray | None = None,
                    soft: SoftLabels | None = None) -> Batch:
        """(B, T+1) token ids (and which of them a teacher wrote) → inputs (B, T) and targets (B, T)."""
        data = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
        mask = None if teacher is None else torch.from_numpy(np.ascontiguousarray(teacher[:, 1:]))
        return Batch(data[:, :-1], data[:, 1:], position, epoch, mask, soft)


class TokenBlocks:
    """A token array as consecutive, non-overlapping blocks of ``block_span(block_size)`` tokens."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size, self.span = tokens, block_size, block_span(block_size)

    def __len__(self) -> int:
        return len(self.tokens) // self.span

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i * self.span : (i + 1) * self.span]

    def stack(self, ids) -> np.ndarray:
        """The blocks ``ids``, stacked: (len(ids), T+1)."""
        return np.stack([self[int(i)] for i in ids])


class EpochOrder:
    """The seeded permutation of n items for each epoch; the last few are kept (thread-safe)."""

    def __init__(self, n: int, seed: int, keep: int = 4) -> None:
        self.n, self.seed, self.keep = n, seed, keep
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                while len(self._orders) > self.keep:
                    self._orders.popitem(last=False)
            return self._orders[epoch]


@dataclass(frozen=True)
class DataPosition:
    """Where a ``BlockLoader`` stands: the next block is ``order(epoch)[index]``."""

    epoch: int = 0
    index: int = 0

    KIND = "corpus"

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "epoch": self.epoch, "index": self.index}

    @staticmethod
    def from_dict(saved: dict) -> DataPosition:
        return DataPosition(saved.get("epoch", 0), saved.get("index", 0))


def _too_few_blocks(what: str, tokens: np.ndarray, block_size: int, wanted: str) -> str:
    return (f"{what} has {len(tokens):,} tokens: {len(tokens) // block_span(block_size)} blocks of "
            f"{block_span(block_size)}, fewer than {wanted}")


class BlockSoftLabels:
    """Soft labels (``soft_labels.SoftLabelShards``) read block by block, as ``TokenBlocks`` reads tokens."""

    def __init__(self, shards, block_size: int, k: int) -> None:
        self.shards, self.span, self.k = shards, block_span(block_size), k

    def stack(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [self.shards.rows(int(i) * self.span, (int(i) + 1) * self.span, self.k) for i in ids]
        return tuple(np.stack(part) for part in zip(*rows, strict=True))

    def targets(self, ids) -> SoftLabels:
        """The soft labels at the targets of blocks ``ids`` (every token but each block's first), read
        straight into the batch's arrays: ``SoftLabels.of_blocks(*self.stack(ids))`` without its three
        copies (the loader's rate with soft labels is a benchmark target)."""
        targets = predicted_rows(self.span)
        shape = (len(ids), targets.stop - targets.start, self.k)
        soft_ids, logprobs = np.empty(shape, np.uint16), np.empty(shape, np.float16)
        for row, i in enumerate(ids):
            self.shards.read_into(int(i) * self.span + targets.start, soft_ids[row], logprobs[row])
        return SoftLabels(torch.from_numpy(soft_ids), torch.from_numpy(logprobs),
                          torch.from_numpy(np.isfinite(logprobs[..., 0])))

    def none(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows for n blocks of a source without soft labels: all masked."""
        return (np.zeros((n, self.span, self.k), np.uint16), np.zeros((n, self.span, self.k), np.float16),
                np.zeros((n, self.span), bool))


class BlockLoader:
    """Seeded, resumable batches of (inputs, targets) from one token array (and its soft labels, when given).

    Each epoch visits every block once in a permutation seeded by (seed, epoch). Rank r of a world of size w
    takes the r-th slice of each group of w·B blocks, so ranks see disjoint data and advance in step.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 position: DataPosition = DataPosition(), rank: int = 0, world_size: int = 1,
                 soft: BlockSoftLabels | None = None) -> None:
        self.blocks, self.batch_size, self.rank = TokenBlocks(tokens, block_size), batch_size, rank
        self.soft = soft
        self.per_step = batch_size * world_size
        if len(self.blocks) < self.per_step:
            raise DataError(_too_few_blocks("the training data", tokens, block_size,
                                            f"one batch of {self.per_step}")
                            + "; use more data, a smaller block size or batch")
        self.position = position
        self.order = EpochOrder(len(self.blocks), seed)

    def next_batch(self) -> Batch:
        epoch, index = self.position.epoch, self.position.index
        if index + self.per_step > len(self.blocks):  # too few blocks left for a whole step: next epoch
            epoch, index = epoch + 1, 0
        start = index + self.rank * self.batch_size
        ids = self.order(epoch)[start : start + self.batch_size]
        self.position = DataPosition(epoch, index + self.per_step)
        soft = self.soft.targets(ids) if self.soft is not None else None
        return Batch.from_blocks(self.blocks.stack(ids), self.position.to_dict(), epoch, soft=soft)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


class MixedBlockLoader:
    """Batches drawn from several token arrays in fixed proportions, seeded and resumable, like
    ``BlockLoader``.

    Block k of the global stream comes from the source furthest behind its share (the largest ``weight·(k+1) −
    taken``): exact proportions at every point, no randomness to replay. Each source walks its own seeded
    permutations of its blocks, starting a new epoch when it runs out, so a small source with a large weight
    is repeated (upsampled) and a large one with a small weight is sampled from. Every rank computes the whole
    global stream and keeps its slice of each step (ranks see disjoint blocks). The position holds each
    source's epoch, index and count taken.
    """

    KIND = "mix"

    def __init__(self, sources: list[np.ndarray], weights: list[float], block_size: int, batch_size: int,
                 seed: int, position: dict | None = None, rank: int = 0, world_size: int = 1,
                 names: list[str] | None = None, soft: list[BlockSoftLabels | None] | None = None) -> None:
        self.blocks = [TokenBlocks(t, block_size) for t in sources]
        # Soft labels where a source has them (the others: masked rows, plain cross-entropy).
        self.soft = soft if soft and any(s is not None for s in soft) else None
        self.batch_size, self.rank, self.per_step = batch_size, rank, batch_size * world_size
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.orders = [EpochOrder(len(b), seed + 1_000_003 * (i + 1)) for i, b in enumerate(self.blocks)]
        empty = [i for i, b in enumerate(self.blocks) if len(b) == 0]
        if empty:
            name = names[empty[0]] if names else f"data source {empty[0] + 1}"
            raise DataError(f"{name} has {len(sources[empty[0]]):,} training tokens, fewer than one block of "
                            f"{block_span(block_size)}: drop it from the list or lower the block size")
        state = (position or {}).get("sources") or [{"epoch": 0, "index": 0, "taken": 0} for _ in sources]
        if len(state) != len(sources):
            raise DataError(f"the data position has {len(state)} sources, the data list {len(sources)}: "
                            "resume with the same --data list")
        self.state = [dict(s) for s in state]
        self.main = max(range(len(sources)), key=lambda i: self.weights[i])  # its epoch is the one logged

    def _next_block(self) -> tuple[int, int]:
        """(source, block) of the next block of the global stream."""
        taken = sum(s["taken"] for s in self.state)
        i = max(range(len(self.state)), key=lambda j: self.weights[j] * (taken + 1) - self.state[j]["taken"])
        s, blocks = self.state[i], self.blocks[i]
        if s["index"] >= len(blocks):
            s["epoch"], s["index"] = s["epoch"] + 1, 0
        block = int(self.orders[i](s["epoch"])[s["index"]])
        s["index"] += 1
        s["taken"] += 1
        return i, block

    def next_batch(self) -> Batch:
        step = [self._next_block() for _ in range(self.per_step)]
        mine = step[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        position = {"kind": self.KIND, "sources": [dict(s) for s in self.state]}
        soft = None
        if self.soft is not None:
            any_source = next(s for s in self.soft if s is not None)
            rows = [self.soft[i].stack([b]) if self.soft[i] else any_source.none(1) for i, b in mine]
            soft = SoftLabels.of_blocks(*(np.concatenate(part) for part in zip(*rows, strict=True)))
        return Batch.from_blocks(np.stack([self.blocks[i][b] for i, b in mine]), position,
                                 self.state[self.main]["epoch"], soft=soft)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


class ShuffleBuffer:
    """Rows of a stream (blocks, and arrays that go with them: which tokens a teacher wrote, ...) held so that
    batches are drawn at random from many documents rather than cut from one, as streaming loaders do
    (Hugging Face ``datasets``' ``shuffle(buffer_size)``, WebDataset, Mosaic streaming).

    Rows come in in stream order (``add``); ``draw`` takes k of them at random, seeded by (seed, rank, number
    of draws), so the same buffer draws the same rows again after a resume. ``columns`` are the arrays
    themselves (never changed in place: a batch's saved position may hold them).
    """

    def __init__(self, columns: dict[str, np.ndarray], seed: int, rank: int = 0, draws: int = 0) -> None:
        self.columns, self.seed, self.rank, self.draws = columns, seed, rank, draws

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.columns = {k: np.concatenate([v, rows[k]]) for k, v in self.columns.items()}

    def draw(self, k: int, shuffle: bool = True) -> dict[str, np.ndarray]:
        """k rows, at random (or the first k, in stream order, without ``shuffle``), taken out."""
        if shuffle:
            picked = np.random.default_rng([self.seed, self.rank, self.draws]).choice(len(self), k,
                                                                                       replace=False)
        else:
            picked = np.arange(k)
        self.draws += 1
        keep = np.ones(len(self), dtype=bool)
        keep[picked] = False
        out = {name: v[picked] for name, v in self.columns.items()}
        self.columns = {name: v[keep] for name, v in self.columns.items()}
        return out


def prefetch(items: Iterator[T], depth: int = 4, join_timeout_s: float = 10.0) -> Iterator[T]:
    """Produce ``items`` in a background thread, ``depth`` ahead. A failure in the producer is raised to the
    consumer; closing the returned generator stops the producer (waiting up to ``join_timeout_s`` for it)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # hand any failure to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True, name="scratchlm-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Stop and join the producer now: a thread still in torch code while the interpreter exits can abort
        # the process. One blocked in I/O (a feed request) ends at its next check of ``stop``.
        stop.set()
        thread.join(timeout=join_timeout_s)


def eval_blocks(tokens: np.ndarray, block_size: int, max_blocks: int) -> torch.Tensor:
    """The fixed evaluation blocks: the first ``max_blocks`` non-overlapping blocks of held-out tokens, (n,
    T+1)."""
    blocks = TokenBlocks(tokens, block_size)
    n = min(len(blocks), max_blocks)
    if n == 0:
        raise DataError(_too_few_blocks("the held-out set", tokens, block_size, "one block")
                        + "; raise eval_fraction or lower block_size")
    return torch.from_numpy(blocks.stack(range(n)).astype(np.int64))
