"""The generation path: a preallocated KV cache and the model's forward through it.

``KVCache.forward(model, idx, positions)`` runs new tokens through the model at their positions, stores their
keys and values, and lets each attend to every cached position up to its own. Positions are (T,) when every
row is at the same place, or (B, T) per row: in continuous batching each row holds a different sequence, and
``rows`` says which cache rows the inputs are. Training never comes here (``Phi.forward``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .cpu_inference import cpu_cached_attention
from .model import Phi


def fused_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention, in q's dtype."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


class KVCache:
    """Keys and values of every layer, (B, nh, max_seq_len, hs) each, for ``batch_size`` sequences."""

    def __init__(self, model: Phi, batch_size: int, max_seq_len: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        self.max_seq_len = max_seq_len or cfg.block_size
        if self.max_seq_len > cfg.block_size:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds block_size {cfg.block_size}")
        device, dtype = model.lm_head.weight.device, dtype or model.lm_head.weight.dtype
        shape = (batch_size, cfg.n_head, self.max_seq_len, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.causal = torch.ones(self.max_seq_len, self.max_seq_len, dtype=torch.bool, device=device).tril()
        # On the CPU the fused kernel is slow for a few queries over a cache (see cpu_inference).
        self.attention = cpu_cached_attention if device.type == "cpu" else fused_cached_attention

    def forward(self, model: Phi, idx: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None,
                kv_len: int | None = None, keep: torch.Tensor | None = None,
                fresh: bool = False) -> torch.Tensor:
        """idx (B, T) at ``positions`` → final hidden states (B, T, n_embd), or (B, 1, n_embd) at ``keep``.

        ``rows`` (B,): the cache rows of idx's rows (default: all, in order). ``kv_len``, if given, must
        exceed every position: attention then reads only that many cached positions instead of the whole cache
        (decoding cost grows with the text, not with the cache size). ``fresh``: idx's rows are whole
        sequences from position 0 (a prefill), so attention is causal over them alone: the fused kernel, no
        mask (a shorter row's padding comes after its tokens, which never see it).
        """
        if positions.dim() == 1:  # the same positions in every row
            cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (T, rotary_dim)
            mask = self.causal[None, None, positions, :kv_len]  # (1, 1, T, L)
        else:
            # (B, 1, T, r)
            cos, sin = model.rope_cos[positions].unsqueeze(1), model.rope_sin[positions].unsqueeze(1)
            mask = self.causal[positions, :kv_len].unsqueeze(1)  # (B, 1, T, L)
        attend = [partial(self._attend, layer, positions, rows, None if fresh else mask)
                  for layer in range(len(self.k))]
        return model.trunk(idx, cos, sin, attend, keep)

    def _attend(self, layer: int, positions: torch.Tensor, rows: torch.Tensor | None,
                mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, nh, T, hs) of ``layer`` and attend q over the first L cached positions."""
        cache_k, cache_v = self.k[layer], self.v[layer]
        if positions.dim() == 1 and rows is None:
            cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
            cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
        else:
            B, T = k.shape[0], k.shape[2]
            b = (rows if rows is not None else torch.arange(B, device=k.device))[:, None]
            pos = positions.expand(B, T)
            cache_k[b, :, pos] = k.transpose(1, 2).to(cache_k.dtype)  # the indexed view is (B, T, nh, hs)
            cache_v[b, :, pos] = v.transpose(1, 2).to(cache_v.dtype)
        if mask is None:  # a prefill from position 0: causal over the new keys alone
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True)
        L = mask.shape[-1]
        if rows is not None:  # gather the rows' first L positions only, not their whole cache
            return self.attention(q, cache_k[rows, :, :L], cache_v[rows, :, :L], mask)
        return self.attention(q, cache_k[:, :, :L], cache_v[:, :, :L], mask)
