"""The LM head and the cross-entropy loss in one pass over row chunks, never holding the whole logits tensor.

For a Phi model the logits are the largest activation by far: Phi-2 at 4 × 2048 tokens has 8192 × 51200 of
them, 3.4 GB in float32 plus as much again for their gradient and the log-softmax autograd keeps. Here each
chunk of rows gets its logits, its loss and, at once, the gradients for the head's input, weight and bias (d
loss / d logits = (softmax − one-hot) / N); only those gradients are kept for backward, so peak memory holds
one chunk of logits. The same idea as Liger-Kernel's fused linear cross-entropy, in plain PyTorch so it runs
on every device.

The matmuls are the same three as with autograd; what goes is the full-size log-softmax, its saved output and
the passes over the logits in backward (timings in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_chunk_rows(device: torch.device) -> int:
    """Rows per chunk: small on a CPU (a chunk of logits stays nearer the caches), large on a GPU (1024 ×
    51200 float32 logits: 210 MB, matmuls big enough to keep it busy)."""
    return 128 if device.type == "cpu" else 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor,
                chunk_rows: int, grad_enabled: bool) -> torch.Tensor:
        # needs_input_grad follows requires_grad even under no_grad: evaluation would pay for gradients
        want_hidden, want_weight, want_bias = (grad_enabled and w for w in ctx.needs_input_grad[:3])
        n = hidden.shape[0]
        device_type = hidden.device.type
        # Under autocast, matmuls run in its dtype (and the gradient matmuls follow: they are autocast ops
        # too).
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        weight_c = weight.to(dtype)  # cast once, not per chunk
        for start in range(0, n, chunk_rows):
            h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=grad.device), t] -= 1.0
            grad /= n
            if want_bias:
                grad_bias += grad.sum(0)
            grad = grad.to(dtype)
            if want_hidden:
                grad_hidden[start : start + chunk_rows] = grad @ weight_c
            if want_weight:
                if grad_weight.dtype == dtype == h.dtype:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += grad.t() @ h.to(dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_loss  # d(final loss) / d(this mean loss): e.g. 1 / grad_accum_steps
        return (grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean of ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` over all rows, and its gradients,
    without materialising the logits. hidden (..., d), targets (...) of token ids."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or default_chunk_rows(hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, torch.is_grad_enabled())
