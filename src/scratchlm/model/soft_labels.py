"""A teacher's distribution as training reads it (``SoftLabels``), and the one rule that places it in a token
stream: row t is the teacher's distribution that predicts token t, from the tokens before it.

So a sequence scored alone has rows for its tokens after the first (nothing before the first predicts it):
``predicted_rows``. A text the teacher wrote has a row for each of its tokens (each was drawn from one; its
prompt is not in the stream). A training block's targets are its tokens after the first: their rows are
``predicted_rows`` of the block too. The feed, the soft-label shards and the loaders place rows by this rule;
the loss reads them as ``SoftLabels``, aligned with the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def predicted_rows(n: int) -> slice:
    """Which tokens of a sequence of ``n``, read (scored, or trained on) alone, have a row: every one but the
    first."""
    return slice(1, n)


@dataclass
class SoftLabels:
    """A teacher's distribution at each target of a batch, truncated to its top k (raw log-probabilities),
    where it has one. Kept in the shards' and the wire's compact types (80 bytes a token at k 20, not 240)
    until the loss widens them on the training device: the loader, its prefetch and the copy to a GPU move a
    third of the bytes."""

    ids: torch.Tensor  # (B, T, k) uint16 (the loss takes them as int64)
    logprobs: torch.Tensor  # (B, T, k) float16 (the loss takes them as float32)
    mask: torch.Tensor  # (B, T) bool: which targets have a row

    @staticmethod
    def of_blocks(ids: np.ndarray, logprobs: np.ndarray, mask: np.ndarray) -> SoftLabels:
        """Rows of (B, T+1) blocks → the rows of their targets (``predicted_rows`` of each block)."""
        targets = predicted_rows(ids.shape[1])
        return SoftLabels(torch.from_numpy(np.ascontiguousarray(ids[:, targets], dtype=np.uint16)),
                          torch.from_numpy(np.ascontiguousarray(logprobs[:, targets], dtype=np.float16)),
                          torch.from_numpy(np.ascontiguousarray(mask[:, targets], dtype=bool)))

    def to(self, device: torch.device) -> SoftLabels:
        return SoftLabels(self.ids.to(device, non_blocking=True), self.logprobs.to(device, non_blocking=True),
                          self.mask.to(device, non_blocking=True))
