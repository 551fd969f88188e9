"""Faster inference on the CPU: Linear weights reordered once into oneDNN's blocked layout.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm, which takes a slow path on AMD processors; oneDNN with a weight
reordered ahead of time does not, and skips the per-call packing on Intel too. Measured on a 2-core AMD EPYC
(AVX512), fp32, 32 rows: the phi-tiny LM head (50295 × 128) 4.3 → 0.9 ms, a 3072 × 768 MLP layer 1.1 → 0.3 ms;
bf16 LM head 1.0 → 0.46 ms. Results equal ``F.linear`` to float rounding (0 to 5e-6 here).

Only for inference: with gradients enabled, or off the CPU, the plain ``F.linear`` runs. The reordered copy is
refreshed whenever the weight changes in place (its version counter moves) or is replaced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Below this many weight elements the oneDNN call's fixed cost (~10 µs) outweighs its gain (measured: a 128 × 128
# layer is 2× slower packed at 1–32 rows, a 512 × 128 one 1.2× faster at 32 rows).
MIN_PACKED_ELEMENTS = 1 << 16


def _supported(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
        if (x.device.type != "cpu" or x.dtype != weight.dtype or not _supported(weight.dtype)
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight.shape, weight.dtype, _version(weight))
        if key != self.key:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.key = key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Route each CPU Linear of ``model`` big enough to gain through a ``PackedLinear``; returns how many.

    The modules keep their parameters (state dicts, saving, training are unchanged); only their forward differs.
    """
    count = 0
    for module in model.modules():
        if (isinstance(module, nn.Linear) and not isinstance(module.forward, PackedLinear)
                and module.weight.device.type == "cpu" and module.weight.numel() >= MIN_PACKED_ELEMENTS
                and _supported(module.weight.dtype)):
            module.forward = PackedLinear(lambda m=module: (m.weight, m.bias))
            count += 1
    return count
