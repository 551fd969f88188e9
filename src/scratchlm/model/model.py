"""The Phi decoder, single-device and readable; parallelism and compilation are applied from outside.

Each block::

    x ──┬──────────────────────────────────────────────┐
        └─ LayerNorm ─┬─ attention (fused QKV, rotary) ─┤+─> x'
                      └─ MLP (fc1, GELU-tanh, fc2) ─────┘

Attention and MLP read the same normalised input and are added to the residual together (Phi-1.5/Phi-2).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .loss import linear_cross_entropy


def rope_cache(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (block_size, rotary_dim), computed in float32 as transformers does."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    positions = torch.arange(cfg.block_size, dtype=torch.float, device=device)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of each head ("rotate half" layout); the rest pass through.

    x: (B, nh, T, hs); cos, sin: (T, rotary_dim) or (B, 1, T, rotary_dim).
    """
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot[..., : rot_dim // 2], x_rot[..., rot_dim // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rot = x_rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


class KVCache(nn.Module):
    """Preallocated keys and values for incremental decoding: (B, nh, max_seq_len, hs) each."""

    def __init__(self, batch_size: int, n_head: int, max_seq_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)
        self.k = nn.Buffer(torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.v = nn.Buffer(torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) and return the keys and values to attend over.

        ``input_pos`` is (T,) when every row is at the same positions, or (B, T) per row (continuous batching);
        ``rows`` picks which cache rows the B inputs belong to (default: all, in order).
        """
        if input_pos.dim() == 1 and rows is None:
            self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
            return self.k, self.v
        B, T = k.shape[0], k.shape[2]
        b = (rows if rows is not None else torch.arange(B, device=k.device))[:, None]
        pos = input_pos.expand(B, T)
        self.k[b, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view is (B, T, nh, hs)
        self.v[b, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        if rows is None:
            return self.k, self.v
        return self.k[rows], self.v[rows]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few new queries over the KV cache; the result has q's dtype.

    On the CPU, PyTorch's fused SDPA kernel is slow for this shape (one query row, a boolean mask): 3.3× slower
    than plain matmul + softmax in bf16 and no faster in fp32 (measured, batch 32, 4 heads, 160 keys), so there we
    spell it out, in float32: bf16 batched matmuls over a slice of the cache are 2–4× slower than float32 ones
    there (and ``setup_kv_cache`` can keep a float32 cache, so that nothing is converted). Elsewhere the fused
    kernel, in q's dtype.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, nh, T, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        # Fused QKV: rows are [q; k; v], each n_embd wide (transformers keeps three Linears; hf.py splits).
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """With a cache, ``mask`` is (B or 1, 1, T, L): attention covers the first L cached positions only."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k = apply_rope(qkv[:2], cos, sin)  # q and k rotated together: half the small ops when decoding
        v = qkv[2]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows)  # (B, nh, max_seq_len, hs)
            L = mask.shape[-1]
            y = cached_attention(q, k[:, :, :L], v[:, :, :L], mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, cos, sin, input_pos, mask, cache_rows) + self.mlp(h)


class Phi(nn.Module):
    """Phi-1.5/Phi-2 causal language model. ``forward(idx)`` returns logits (B, T, padded_vocab_size)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=True)
        cos, sin = rope_cache(cfg, device=self.embed.weight.device)
        self.rope_cos = nn.Buffer(cos, persistent=False)
        self.rope_sin = nn.Buffer(sin, persistent=False)
        self.causal_mask: torch.Tensor | None = None
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init, GPT-2 style, and the rotary tables (also after ``to_empty`` from the meta device).

        - Embedding and every Linear weight: normal(0, init_std).
        - Residual output projections (attention ``proj`` and MLP ``fc2``): normal(0, init_std / sqrt(2·n_layer)),
          so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        - Biases zero; LayerNorm weight one, bias zero.
        With init_std 0.02 the fresh model predicts nearly uniformly: loss ≈ ln(vocab) ≈ 10.83.
        """
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("attn.proj") or name.endswith("mlp.fc2")
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else cfg.init_std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.reset_rope()

    def reset_rope(self) -> None:
        cos, sin = rope_cache(self.config, device=self.embed.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache_rows: torch.Tensor | None = None, kv_len: int | None = None,
                logits_at: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids → logits (B, T, padded_vocab_size); see ``features`` for the other arguments.

        With ``targets`` (B, T), the mean cross-entropy loss instead, through the chunked head + loss of
        ``loss.linear_cross_entropy`` (the logits are never held whole). Training calls it this way, through the
        model's own forward, so that DDP and FSDP wrappers see the head's parameters used as usual.
        """
        hidden = self.features(idx, input_pos, cache_rows, kv_len, logits_at)
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, self.lm_head.bias, targets)
        return self.lm_head(hidden)

    def features(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                 cache_rows: torch.Tensor | None = None, kv_len: int | None = None,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids → final hidden states (B, T, n_embd), the LM head's input.

        With a KV cache set up (``setup_kv_cache``), ``input_pos`` gives the positions of idx's tokens, (T,) shared
        by all rows or (B, T) per row; their keys and values are stored there and each token attends to every cached
        position up to its own. ``cache_rows`` (B,) says which cache rows idx's rows are (default: all).
        ``kv_len``, if given, must exceed every position in input_pos: attention then reads only that many cached
        positions instead of the whole cache (decoding cost grows with the text, not with the cache size).
        ``logits_at`` (B,), if given, keeps that one position per row only (B, 1, n_embd): a prefill needs just the
        last prompt token's logits, and the LM head is the costliest layer of a small model.
        """
        B, T = idx.shape
        mask = None
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            if self.causal_mask is None:
                raise RuntimeError("input_pos needs a KV cache: call setup_kv_cache first")
            if input_pos.dim() == 1:
                cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
                mask = self.causal_mask[None, None, input_pos, :kv_len]  # (1, 1, T, kv_len)
            else:
                cos, sin = self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1)
                mask = self.causal_mask[input_pos, :kv_len].unsqueeze(1)  # (B, 1, T, kv_len)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, input_pos, mask, cache_rows)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)
        return self.final_norm(x)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None,
                       dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache of ``max_seq_len`` positions (default block_size) for every block."""
        max_seq_len = max_seq_len or self.config.block_size
        if max_seq_len > self.config.block_size:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds block_size {self.config.block_size}")
        device, dtype = self.lm_head.weight.device, dtype or self.lm_head.weight.dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_seq_len, self.config.head_size,
                                          dtype, device)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.causal_mask = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
