"""Choosing each new token: greedy, or temperature + top-k + top-p sampling, exactly, without sorting the
vocabulary at every step.

Every row of a batch has its own settings (rows belong to different requests) and its own uniform random
numbers, drawn from that sequence's own seeded generator: a seeded sequence draws the same numbers whatever
else shares its batch. Its tokens are the same as long as its logits are; in fp32 on a CPU the last bits of
a product depend on the batch's size (the order in which oneDNN sums), and where the probabilities are nearly
flat a draw that lands on a boundary between two tokens can take the other one.

- top-k rows: ``torch.topk`` picks the k candidates (a partial selection, not a sort); top-p then applies
  among them.
- top-p over the whole vocabulary: rejection sampling with a rising pivot, as FlashInfer does. Draw a token
  from the probabilities above the pivot; accept it if the tokens more probable than it hold less than top_p
  of the mass (it is then in the nucleus); else raise the pivot to its probability and draw again. The nucleus
  is an upper set of the probabilities, so it always stays above the pivot, and an accepted draw is
  distributed as the probabilities restricted to the nucleus: the exact top-p distribution. Each round is a
  few passes over the row; most rows accept in the first. The rare row that has not accepted after ``ROUNDS``
  falls back to a sort.
- Draws use the inverse CDF: one uniform number per row per round, a cumulative sum and a binary search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ConfigDict

from ..config import NonNegativeInt
from .settings import Sampling

ROUNDS = 8
"""Rejection rounds before a row falls back to sorting (each round accepts with probability ≥ 1 − top_p of the
mass left, so this almost never happens)."""
UNIFORMS_PER_STEP = ROUNDS + 1
CPU_ROWS_PER_CHUNK = 8
"""Rows of 50k probabilities sampled together on a CPU: 1.6 MB, within its cache."""
"""Uniform numbers a sampled sequence draws at every step (a fixed count: its stream stays reproducible)."""


class SamplingParams(Sampling):
    """What the engine is asked for one request: the sampling settings, when to stop and what to return."""

    model_config = ConfigDict(**Sampling.model_config, frozen=True)

    stop_at_eot: bool = True
    logprobs: NonNegativeInt = 0
    """Return, for every new token, the k most likely tokens of the raw distribution (before temperature,
    top-k and top-p) and their log-probabilities, and the new token's own (0: none)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class RowSettings:
    """The sampling settings of each row of a batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # (B,) float; 0 = greedy
    top_k: torch.Tensor  # (B,) long; 0 = no top-k
    top_p: torch.Tensor  # (B,) float; 1 = no top-p

    @staticmethod
    def of(params: list[SamplingParams], device: torch.device) -> RowSettings:
        return RowSettings(torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                           torch.tensor([p.top_k or 0 for p in params], dtype=torch.long, device=device),
                           torch.tensor([p.top_p if p.top_p is not None else 1.0 for p in params],
                                        dtype=torch.float32, device=device))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor,
                 scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An index per row drawn in proportion to ``weights`` (B, N) ≥ 0, from uniforms ``u`` (B,) in [0, 1),
    and each row's total weight; ``scratch``, a buffer of the weights' shape, saves an allocation."""
    cum = torch.cumsum(weights, dim=-1, out=scratch) if scratch is not None else weights.cumsum(dim=-1)
    total = cum[:, -1].clone()
    target = (u * total).unsqueeze(-1).to(cum.dtype)
    index = torch.searchsorted(cum, target, right=True).squeeze(-1).clamp_(max=weights.shape[-1] - 1)
    return index, total


def _nucleus_of_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities sorted in decreasing order (B, N) with those outside each row's top-p nucleus set to 0:
    a token stays while the mass before it is below top_p (the smallest set reaching top_p)."""
    before = probs.cumsum(dim=-1) - probs
    return probs.masked_fill(before >= top_p.unsqueeze(-1), 0.0)


def _sample_top_k(logits: torch.Tensor, inverse_t: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor:
    """Rows with a top-k: among their k most likely tokens (top-p applied there). The k are the same at any
    temperature, so only their k logits are scaled: no pass over the whole vocabulary but the selection."""
    k = int(top_k.max())
    values, ids = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)  # sorted, decreasing
    values = values * inverse_t
    beyond = torch.arange(values.shape[-1], device=values.device).unsqueeze(0) >= top_k.unsqueeze(-1)
    probs = values.masked_fill(beyond, float("-inf")).softmax(dim=-1)
    pick, _ = _inverse_cdf(_nucleus_of_sorted(probs, top_p), u)
    return ids.gather(1, pick.unsqueeze(-1)).squeeze(-1)


def _mass_above(w: torch.Tensor, level: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the total weight of the tokens weighted more than ``level`` (B, 1).

    Written as Σ relu(w − level) + level · #(w > level): in-place elementwise passes that are several times
    cheaper on a CPU than a masked select (``torch.where``) or a comparison to a boolean tensor.
    """
    excess = torch.sub(w, level, out=scratch) if scratch is not None else w - level
    above = excess.relu_().sum(dim=-1)
    return above + level.squeeze(-1) * excess.sign_().sum(dim=-1)


def _sample_top_p(weights: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Rows sampled over the whole vocabulary, restricted to the top-p nucleus by rejection (module
    docstring). ``weights`` (B, V): probabilities up to a factor per row (no need to normalise them); ``u``
    (B, UNIFORMS_PER_STEP); ``scratch``, a buffer of the weights' shape for the first round."""
    # The first round, on every row (most accept here).
    tokens, total = _inverse_cdf(weights, u[:, 0], scratch)
    level = weights.gather(1, tokens.unsqueeze(-1))  # (B, 1): the drawn tokens' weights
    cut = top_p * total  # the nucleus's share of each row's weight
    accepted = (_mass_above(weights, level, scratch) < cut) | (top_p >= 1.0)
    if bool(accepted.all()):
        return tokens
    # Later rounds, on the few rows still drawing: only tokens above the last draw's weight.
    rows = (~accepted).nonzero().squeeze(-1)
    pivot = level.squeeze(-1)[rows]
    for r in range(1, ROUNDS):
        w = weights[rows]
        drawn, _ = _inverse_cdf(torch.where(w > pivot.unsqueeze(-1), w, 0.0), u[rows, r])
        w_drawn = w.gather(1, drawn.unsqueeze(-1))  # (b, 1)
        accepted = _mass_above(w, w_drawn) < cut[rows]
        tokens[rows[accepted]] = drawn[accepted]
        pivot, rows = w_drawn.squeeze(-1)[~accepted], rows[~accepted]
        if len(rows) == 0:
            return tokens
    # Still drawing after ROUNDS (vanishingly rare): the exact sorted path for those rows.
    sorted_w, order = torch.sort(weights[rows], dim=-1, descending=True)
    pick, _ = _inverse_cdf(_nucleus_of_sorted(sorted_w / total[rows].unsqueeze(-1), top_p[rows]),
                           u[rows, ROUNDS])
    tokens[rows] = order.gather(1, pick.unsqueeze(-1)).squeeze(-1)
    return tokens


def sample(logits: torch.Tensor, settings: RowSettings, uniforms: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) → next token ids (B,). ``uniforms`` (B, UNIFORMS_PER_STEP) in [0, 1), one row per
    sequence (ignored for greedy rows; may be None if every row is greedy)."""
    logits = logits.float()  # also contiguous: argmax over a strided bf16 view is several times slower on CPU
    sampled = settings.temperature > 0
    if not bool(sampled.any()):
        return logits.argmax(dim=-1)
    tokens = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    if not bool(sampled.all()):
        greedy = (~sampled).nonzero().squeeze(-1)
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    rows = sampled.nonzero().squeeze(-1)
    every = len(rows) == len(logits)  # the usual case: skip the row selections (each a copy of the logits)
    chosen = logits if every else logits[rows]
    inverse_t = (1.0 / settings.temperature[rows]).unsqueeze(-1)
    top_k, top_p, u = settings.top_k[rows], settings.top_p[rows], uniforms[rows]
    with_k = top_k > 0
    if bool(with_k.all()):  # the usual case with a top-k: no copy of the rows
        tokens[rows] = _sample_top_k(chosen, inverse_t, top_k, top_p, u[:, 0])
        return tokens
    if bool(with_k.any()):
        tokens[rows[with_k]] = _sample_top_k(chosen[with_k], inverse_t[with_k], top_k[with_k], top_p[with_k],
                                             u[with_k, 0])
    if not bool(with_k.any()):
        tokens[rows] = _sample_top_p_in_chunks(chosen, inverse_t, top_p, u)
    else:
        rest = ~with_k
        tokens[rows[rest]] = _sample_top_p_in_chunks(chosen[rest], inverse_t[rest], top_p[rest], u[rest])
    return tokens


def _sample_top_p_in_chunks(logits: torch.Tensor, inverse_t: torch.Tensor, top_p: torch.Tensor,
                            u: torch.Tensor) -> torch.Tensor:
    """``_sample_top_p`` of softmax(logits / T), in groups of rows small enough to stay in a CPU's cache
    between the passes (a GPU takes them all together). The weights are exp((logits − max) / T): the softmax
    without its normalisation, which the sampler does not need."""
    step = CPU_ROWS_PER_CHUNK if logits.device.type == "cpu" else len(logits)
    # reused: no allocations
    weights, scratch = torch.empty_like(logits[:step]), torch.empty_like(logits[:step])
    parts = []
    for i in range(0, len(logits), step):
        chunk = logits[i : i + step]
        w = torch.sub(chunk, torch.amax(chunk, dim=-1, keepdim=True), out=weights[: len(chunk)])
        w.mul_(inverse_t[i : i + step]).exp_()
        parts.append(_sample_top_p(w, top_p[i : i + step], u[i : i + step], scratch[: len(chunk)]))
    return torch.cat(parts)
