"""Throughput, MFU and memory arithmetic, kept apart from the loop so it can be tested by hand-computed
values."""

from __future__ import annotations

import resource
import sys

import torch

PEAK_BF16_FLOPS: dict[str, float] = {
    # Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity).
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def gpu_peak_flops(device: torch.device) -> tuple[str, float] | None:
    """(card name, peak bf16 FLOP/s) for a known CUDA card, else None (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return key, peak
    return None


def tokens_per_second(tokens: int, seconds: float) -> float:
    """Tokens processed in a window divided by that window's duration (not by a timestamp)."""
    return tokens / seconds if seconds > 0 else 0.0


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices used."""
    return flops_per_token * tokens_per_s / (peak_flops * n_devices)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


class Window:
    """Accumulates tokens, step time and data-wait time between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.data_seconds = 0.0

    def add(self, tokens: int, seconds: float, data_seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.data_seconds += data_seconds

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_second(self.tokens, self.seconds)

    @property
    def data_wait_share(self) -> float:
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0
