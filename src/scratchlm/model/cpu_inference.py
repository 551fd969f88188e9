"""Faster generation on the CPU: linear layers through oneDNN with weights reordered once, and cached
attention spelt out in float32.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm, which takes a slow path on AMD processors; oneDNN with a
weight reordered ahead of time does not, and skips the per-call packing on Intel too. Results equal
``F.linear`` to float rounding. Only for inference: with gradients enabled, or off the CPU, the plain
``F.linear`` runs. The reordered copy is refreshed whenever the weight changes in place (its version counter
moves) or is replaced. Measurements are in ``bench/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_PACKED_ELEMENTS = 1 << 16
"""Smaller layers stay on ``F.linear``: there the oneDNN call's fixed cost outweighs its gain."""


def _supported(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    native_bf16 = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32 or native_bf16


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it cannot change outside inference mode
        return 0


class PackedLinear:
    """``F.linear(x, *params())`` through oneDNN with the weight reordered once (see the module docstring)."""

    def __init__(self, params: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.params = params
        self.key: tuple | None = None
        self.packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.params()
        # Inside a compiled graph the plain op: the compiler cannot trace oneDNN's packed weight, and plans
        # the product itself.
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != weight.dtype
                or not _supported(weight.dtype)
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight.shape, weight.dtype, _version(weight))
        if key != self.key:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.key = key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Route each CPU Linear of ``model`` big enough to gain through a ``PackedLinear``; returns how many.

    The modules keep their parameters (state dicts, saving, training are unchanged); only their forward
    differs.
    """
    count = 0
    for module in model.modules():
        if (isinstance(module, nn.Linear) and not isinstance(module.forward, PackedLinear)
                and module.weight.device.type == "cpu" and module.weight.numel() >= MIN_PACKED_ELEMENTS
                and _supported(module.weight.dtype)):
            module.forward = PackedLinear(lambda m=module: (m.weight, m.bias))
            count += 1
    return count


def cpu_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few new queries over a KV cache, spelt out in float32; the result has q's dtype.

    For this shape (one query row, a boolean mask) PyTorch's fused CPU kernel is slower than matmul + softmax,
    and bf16 batched matmuls over a slice of the cache are slower than float32 ones, so the generator keeps a
    float32 cache on the CPU and nothing is converted.
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, nh, T, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)
