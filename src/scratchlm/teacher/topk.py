"""The raw distribution's top k, from rows of logits: what a teacher hands over at each position it generates
or scores (before temperature, top-k and top-p)."""

from __future__ import annotations

import torch

from .protocol import TopK


def raw_top_k(logits: torch.Tensor, tokens: torch.Tensor, k: int, ranks: bool = False,
              scratch: torch.Tensor | None = None) -> TopK:
    """The raw distribution of each row of ``logits`` (n, V): its k most likely tokens and their
    log-probabilities (``torch.topk``: a partial selection), the log-probability of ``tokens`` (n,) and, with
    ``ranks``, where each of those ranks.

    The normaliser is spelt out (max from the top-k, then subtract, exp and sum in ``scratch``, a float32
    buffer of at least the logits' shape): on the CPU several times faster than ``torch.logsumexp`` over a
    50k-wide row, which allocates as it goes (bench/RESULTS.md).
    """
    logits = logits.float()
    values, ids = torch.topk(logits, k, dim=-1)
    top = values[:, :1]
    out = scratch[: len(logits), : logits.shape[1]] if scratch is not None else None
    lse = torch.sub(logits, top, out=out).exp_().sum(dim=-1, keepdim=True).log_().add_(top)
    chosen = logits.gather(1, tokens.view(-1, 1).long())
    rank = (logits > chosen).sum(dim=-1) + 1 if ranks else None
    return TopK(ids.to(torch.int32).cpu().numpy(), (values - lse).cpu().numpy(),
                (chosen - lse).squeeze(1).cpu().numpy(), rank.cpu().numpy() if ranks else None)
