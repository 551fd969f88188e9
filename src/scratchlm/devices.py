"""Choosing the device, the same way for every command."""

from __future__ import annotations

import torch

from .config import ConfigError


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a setting names; a bare 'cuda' is this process's GPU (its local rank under torchrun)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{spec}' was asked for but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
