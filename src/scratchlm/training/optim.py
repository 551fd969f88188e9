"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .config import TrainConfig

Shape = Literal["cosine", "wsd", "constant"]


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every optimizer step of one run: a linear warmup, then a constant rate, a cosine
    decay, or warmup-stable-decay (constant, then a short final decay of shape 1 − √progress)."""

    shape: Shape
    peak: float
    floor: float
    warmup_steps: int
    decay_start: int | None = None
    """First step of the decay (cosine: the end of warmup; wsd: the end of the constant phase)."""
    decay_end: int | None = None
    """The step from which the rate stays at ``floor``; None: the rate never decays."""
    decay_from: float | None = None
    """The rate the decay starts from: the peak, or the rate of the run a decay branched off, at that step."""

    def at(self, step: int | np.ndarray) -> float | np.ndarray:
        """The rate of optimizer step ``step`` (0-based); an array of steps gives an array of rates."""
        s = np.asarray(step, dtype=float)
        rate = np.full(s.shape, self.peak)
        if self.decay_end is not None and self.decay_start is not None:
            progress = np.clip((s - self.decay_start) / max(1, self.decay_end - self.decay_start), 0.0, 1.0)
            top = self.peak if self.decay_from is None else self.decay_from
            # wsd's 1 − √progress: the cooldown that did best in Hägele et al. 2024, "Scaling Laws and
            # Compute-Optimal Training Beyond Fixed Training Durations"
            cosine = self.shape == "cosine"
            fall = 0.5 * (1.0 + np.cos(np.pi * progress)) if cosine else 1.0 - np.sqrt(progress)
            rate = np.where(s >= self.decay_start, self.floor + fall * (top - self.floor), rate)
        if self.warmup_steps:
            rate = np.where(s < self.warmup_steps, self.peak * (s + 1) / self.warmup_steps, rate)
        return float(rate) if rate.ndim == 0 else rate

    def rates(self, steps: int) -> np.ndarray:
        """The rates of steps 0 … ``steps`` − 1."""
        return self.at(np.arange(steps))


def run_length(cfg: TrainConfig, tokens_per_step: int) -> int | None:
    """The run's length in steps as the settings give it: ``max_steps``, else ``max_tokens`` in steps; None
    when only a time or a target loss ends it."""
    return cfg.max_steps or (cfg.max_tokens // tokens_per_step if cfg.max_tokens else None)


def schedule_for(cfg: TrainConfig, total_steps: int | None) -> LRSchedule:
    """The schedule ``cfg`` asks for over a run of ``total_steps`` (``lr_decay_steps`` takes its place when
    set); with no known length the rate stays at its peak after warmup."""
    end = cfg.lr_decay_steps or total_steps
    if cfg.lr_schedule == "constant" or end is None:
        return LRSchedule(cfg.lr_schedule, cfg.lr, cfg.min_lr, cfg.warmup_steps)  # never decays
    if cfg.lr_schedule == "cosine":
        return LRSchedule("cosine", cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.warmup_steps, end)
    length = cfg.decay_steps if cfg.decay_steps is not None else round(cfg.decay_fraction * end)
    return LRSchedule("wsd", cfg.lr, cfg.min_lr, cfg.warmup_steps, max(cfg.warmup_steps, end - length), end)


def decay_branch(cfg: TrainConfig, step: int, rate: float, decay_steps: int) -> LRSchedule:
    """A decay branched off another run at ``step``, where its rate was ``rate``: down to min_lr over
    ``decay_steps``."""
    return LRSchedule("wsd", cfg.lr, cfg.min_lr, cfg.warmup_steps, step, step + decay_steps, rate)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear weights, embedding) only; biases and LayerNorm parameters get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters (fused on a GPU)."""
    # fused on a GPU; on a CPU the multi-tensor path (torch's CPU default is a loop over parameters)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda", foreach=device.type != "cuda")
