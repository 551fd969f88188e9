"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, decay_steps: int | None) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if decay_steps is None:
        return cfg.lr
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def decay_steps(cfg: TrainConfig, tokens_per_step: int) -> int | None:
    """Steps of warmup + decay: ``lr_decay_steps``, else ``max_steps``, else ``max_tokens`` in steps; None (a
    constant rate after warmup) when no length is known."""
    from_tokens = cfg.max_tokens // tokens_per_step if cfg.max_tokens else None
    return cfg.lr_decay_steps or cfg.max_steps or from_tokens


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear weights, embedding) only; biases and LayerNorm parameters get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (fused on a GPU)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")
