"""Batched sampling from our Phi with a preallocated KV cache and continuous batching.

Each of ``batch_size`` slots holds one sequence. A finished sequence (``<|endoftext|>`` or max new tokens)
frees its slot at once, and the next prompt is prefilled into that slot's cache rows while the others keep
decoding, so a long sequence never holds the whole batch back. Prompts of different lengths need no padding
tricks: every row carries its own positions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..model.cpu_inference import PackedLinear, pack_linears
from ..model.kv_cache import KVCache
from ..model.model import Phi


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int | None = None
    top_p: float | None = None
    stop_at_eot: bool = True


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) → next ids (B,): greedy, or temperature + top-k + top-p sampling."""
    logits = logits.float()  # also contiguous: argmax over a strided bf16 view is several times slower on CPU
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep the smallest set reaching top_p
        drop = cumulative - sorted_logits.softmax(dim=-1) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Slot:
    index: int  # which prompt
    pos: int  # position of the next token to feed
    last: int  # the token to feed next
    out: list[int]


class BatchGenerator:
    """Continuous-batching generation with our model; one instance owns the model's KV cache."""

    def __init__(self, model: Phi, eot_id: int, batch_size: int = 32, max_seq_len: int | None = None) -> None:
        self.model, self.eot_id, self.batch_size = model.eval(), eot_id, batch_size
        self.max_seq_len = min(max_seq_len or model.config.block_size, model.config.block_size)
        self.vocab_size = model.config.vocab_size
        self.device = model.lm_head.weight.device
        # The LM head restricted to real token ids: padding rows are never sampled, so never computed.
        head = model.lm_head
        self.head = PackedLinear(lambda: (head.weight[: self.vocab_size], head.bias[: self.vocab_size]))
        # on the CPU: oneDNN with reordered weights, several times faster than plain F.linear
        pack_linears(model)
        # A float32 cache on the CPU: attention there runs in float32 (see ``cpu_cached_attention``).
        self.cache = KVCache(model, batch_size, self.max_seq_len,
                             dtype=torch.float32 if self.device.type == "cpu" else None)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_embd) → logits over the real vocabulary (B, vocab_size)."""
        return self.head(hidden[:, -1])

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (the stop token, if hit, not included), in prompt order."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        room = self.max_seq_len - params.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in "
                             f"{self.max_seq_len} positions")
        # keep the prompt's end
        pending = deque((i, (p or [self.eot_id])[-room:]) for i, p in enumerate(prompts))
        slots: list[_Slot | None] = [None] * self.batch_size
        results: list[list[int] | None] = [None] * len(prompts)

        def finish(row: int) -> None:
            slot = slots[row]
            results[slot.index] = slot.out
            slots[row] = None

        def accept(row: int, token: int) -> None:
            slot = slots[row]
            if params.stop_at_eot and token == self.eot_id:
                finish(row)
                return
            slot.out.append(token)
            slot.last = token
            if len(slot.out) >= params.max_new_tokens:
                finish(row)

        while pending or any(slots):
            free = [r for r, s in enumerate(slots) if s is None][: len(pending)]
            if free:  # prefill new prompts into the free rows
                group = [pending.popleft() for _ in free]
                lengths = torch.tensor([len(p) for _, p in group], device=self.device)
                width = int(lengths.max())
                idx = torch.full((len(group), width), self.eot_id, dtype=torch.long, device=self.device)
                for j, (_, p) in enumerate(group):
                    idx[j, : len(p)] = torch.tensor(p, device=self.device)
                pos = torch.arange(width, device=self.device).expand(len(group), width)
                hidden = self.cache.forward(self.model, idx, pos, torch.tensor(free, device=self.device),
                                            kv_len=width, keep=lengths - 1)
                tokens = sample_next(self._logits(hidden), params, generator).tolist()
                for row, (i, p), tok in zip(free, group, tokens, strict=True):
                    slots[row] = _Slot(i, len(p), tok, [])
                    accept(row, tok)
            active = [r for r, s in enumerate(slots) if s is not None]
            if not active:
                continue
            idx = torch.tensor([[slots[r].last] for r in active], device=self.device)
            positions = [slots[r].pos for r in active]
            rows = None if len(active) == self.batch_size else torch.tensor(active, device=self.device)
            # all in step: the cheaper shared-position path
            if rows is None and min(positions) == max(positions):
                pos = torch.tensor(positions[:1], device=self.device)
            else:
                pos = torch.tensor(positions, device=self.device)[:, None]
            # Attend over the cache only as far as the longest sequence (rounded up: fewer distinct shapes).
            kv_len = min(self.max_seq_len, -(-(max(positions) + 1) // 16) * 16)
            hidden = self.cache.forward(self.model, idx, pos, rows, kv_len=kv_len)
            tokens = sample_next(self._logits(hidden), params, generator).tolist()
            for row, tok in zip(active, tokens, strict=True):
                slots[row].pos += 1
                accept(row, tok)
        return [r if r is not None else [] for r in results]
