"""The Phi decoder, single-device and readable; parallelism and compilation are applied from outside.

Each block::

    x ──┬──────────────────────────────────────────────┐
        └─ LayerNorm ─┬─ attention (fused QKV, rotary) ─┤+─> x'
                      └─ MLP (fc1, GELU-tanh, fc2) ─────┘

Attention and MLP read the same normalised input and are added to the residual together (Phi-1.5/Phi-2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .loss import Distill, LossTerms, linear_cross_entropy
from .soft_labels import SoftLabels


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


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Attention of queries over keys and values, (B, nh, T, hs) each → (B, nh, T, hs); a KV cache supplies one
that stores the new keys and values and attends over the cached ones (``kv_cache.KVCache``)."""


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        # Fused QKV: rows are [q; k; v], each n_embd wide (transformers keeps three Linears; hf.py splits).
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend = causal_attention) -> torch.Tensor:
        B, T, C = x.shape
        # (3, B, nh, T, hs)
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)  # q and k rotated together: half the small ops when decoding
        y = attend(q, k, qkv[2])  # (B, nh, T, hs)
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
                attend: Attend = causal_attention) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, cos, sin, attend) + self.mlp(h)


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
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init, GPT-2 style, and the rotary tables (also after ``to_empty`` from the meta device).

        - Embedding and every Linear weight: normal(0, init_std).
        - Residual output projections (attention ``proj`` and MLP ``fc2``): normal(0, init_std /
          sqrt(2·n_layer)), so the residual stream's variance does not grow with depth (GPT-2 paper, section
          2.3).
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                soft: SoftLabels | None = None, distill: Distill | None = None) -> torch.Tensor | LossTerms:
        """idx (B, T) token ids → logits (B, T, padded_vocab_size), for inference.

        With ``targets`` (B, T), the loss instead, always as ``LossTerms`` (the loss, its cross-entropy and
        its KL), through the chunked head + loss of ``loss.linear_cross_entropy`` (the logits are never held
        whole): the mean cross-entropy, or with a teacher's ``soft`` labels and ``distill``, the distillation
        loss. Training calls it this way, through the model's own forward, so that DDP and FSDP wrappers see
        the head's parameters used as usual.
        """
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        hidden = self.trunk(idx, self.rope_cos[:T], self.rope_sin[:T])  # (B, T, n_embd)
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, self.lm_head.bias, targets, soft=soft,
                                        distill=distill)
        return self.lm_head(hidden)

    def trunk(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attend: Sequence[Attend] | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) → final hidden states (B, T, n_embd), the LM head's input.

        ``cos``/``sin`` are the rotary tables at idx's positions; ``attend`` gives each layer's attention
        (default causal over idx alone; a KV cache gives its own); ``keep`` (B,) keeps one position per row
        before the final norm, (B, 1, n_embd): a prefill needs the last prompt token's only.
        """
        x = self.embed(idx)  # (B, T, n_embd)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin) if attend is None else block(x, cos, sin, attend[i])
        if keep is not None:
            x = x[torch.arange(x.shape[0], device=x.device), keep].unsqueeze(1)
        return self.final_norm(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
