"""The LM head and the loss in one pass over row chunks, never holding the whole logits tensor.

For a Phi model the logits are the largest activation by far: Phi-2 at 4 × 2048 tokens has 8192 × 51200 of
them, 3.4 GB in float32 plus as much again for their gradient and the log-softmax autograd keeps. Here each
chunk of rows gets its logits, its loss and, at once, the gradients for the head's input, weight and bias (d
loss / d logits, formed on the spot); only those gradients are kept for backward, so peak memory holds one
chunk of logits. The same idea as Liger-Kernel's fused linear cross-entropy, in plain PyTorch so it runs on
every device.

The loss is the cross-entropy of the next token or, where a teacher's distribution is given (``SoftLabels``),
``(1 − A) · cross-entropy + A · T² · KL(teacher ‖ student)``, distillation's forward KL at temperature T. The
teacher's distribution arrives truncated to its top k; it is made whole with one more bucket, "every other
token", holding the rest of its mass (1 − Σ top-k), matched against the student's own mass outside those k
ids. Top-k alone, renormalised, would tell the student that everything else has probability 0 and push it to
be over-confident (Anshumann et al. 2025). The gradient at the logits is ``p − t``: the student's distribution
less a target that is the teacher's top-k where it has them and, elsewhere, the rest mass spread as the
student spreads its own. At T ≠ 1 the rest bucket is tempered as one token would be (exact at T = 1, the
default that Busbridge et al. 2025 recommend).

The matmuls are the same three as with autograd; what goes is the full-size log-softmax, its saved output and
the passes over the logits in backward (timings in ``bench/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .soft_labels import SoftLabels


def default_chunk_rows(device: torch.device) -> int:
    """Rows per chunk: small on a CPU (a chunk of logits stays nearer the caches), large on a GPU (1024 ×
    51200 float32 logits: 210 MB, matmuls big enough to keep it busy)."""
    return 128 if device.type == "cpu" else 1024


@dataclass(frozen=True)
class Distill:
    """How a batch's soft labels enter the loss."""

    weight: float
    """A: the share of the loss that is the KL, where a position has a teacher's distribution."""
    temperature: float = 1.0


def _kd_rows(logits: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """At T ≠ 1, for rows of student ``logits`` (n, V) and the teacher's top-k (``ids``, ``teacher_lp``: (n,
    k)): the KL of each row (n,) over the k ids and the rest bucket, and its gradient at the tempered logits
    (n, V). The tempered softmax is another softmax than the cross-entropy's, so it takes its own passes."""
    t = temperature
    z = logits / t
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = (z - lse).exp()  # the student's tempered distribution
    kl, rest_ratio, q_k = _kd_terms(z.gather(1, ids) - lse, teacher_lp, t)
    # The target: the teacher's top-k where it has them, the rest mass spread as the student spreads its own.
    target = p * rest_ratio.unsqueeze(1)
    target.scatter_(1, ids, q_k)
    return kl, p.sub_(target)


def _kd_terms(log_p_k: torch.Tensor, teacher_lp: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KL of each row over the teacher's k ids and the rest bucket, from the student's log-probabilities
    at those ids (n, k); with the ratio of the teacher's rest mass to the student's (n,), and the teacher's
    (tempered) probabilities at the ids (n, k). Small tensors only: k + 1 buckets a row."""
    # log of the student's mass outside the k ids: log(1 − exp(logsumexp(log_p_k))), stably
    log_p_rest = torch.log(-torch.expm1(torch.logsumexp(log_p_k, dim=-1).clamp(max=-1e-7)))
    q_k = teacher_lp.exp()
    q_rest = (1.0 - q_k.sum(dim=-1)).clamp(min=0.0)
    if temperature != 1.0:  # the k + 1 buckets tempered together (the rest as if one token)
        rest = torch.log(q_rest.clamp(min=1e-30)).unsqueeze(1)
        q = (torch.cat([teacher_lp, rest], dim=1) / temperature).softmax(dim=-1)
        q_k, q_rest = q[:, :-1], q[:, -1]
    log_q_k = torch.where(q_k > 0, q_k.clamp(min=1e-30).log(), torch.zeros_like(q_k))
    kl = (q_k * (log_q_k - log_p_k)).sum(dim=-1) + torch.where(
        q_rest > 0, q_rest * (q_rest.clamp(min=1e-30).log() - log_p_rest), torch.zeros_like(q_rest))
    return kl, q_rest / log_p_rest.exp(), q_k


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, soft_ids: torch.Tensor | None,
                soft_lp: torch.Tensor | None, a: torch.Tensor | None, distill: Distill | None,
                rows_total: int, want_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of float32 ``logits`` (n, V): its summed loss, cross-entropy and KL (labelled rows only),
    and, with ``want_grad``, d(mean loss over ``rows_total`` rows) / d logits, formed in place of the logits.

    The softmax is spelt out in place (max, subtract, exp, sum): on a CPU ``torch.logsumexp`` over 50k-wide
    rows allocated and took 40% of a phi-tiny step. At T = 1 the KL shares it: the gradient of (1 − A)·CE +
    A·KL is p·(1 − A·r) − (1 − A)·onehot(target) + A·(r·p − q) at the teacher's k ids (r: the teacher's rest
    mass over the student's), so a distilled chunk makes the same passes over the logits as a plain one, the
    row scale folded into the softmax's normalisation."""
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    t = distill.temperature if distill is not None else 1.0
    distilling = a is not None and bool((a > 0).any())
    if distilling and t != 1.0:
        return _tempered_chunk_loss(logits, targets, soft_ids, soft_lp, a, t, rows_total, want_grad)
    target_logit = logits[rows, targets]
    top_logits = logits.gather(1, soft_ids) if distilling else None  # before the logits are overwritten
    peak = logits.amax(dim=-1)
    p = logits.sub_(peak[:, None]).exp_()  # the unnormalised softmax, in place of the logits
    total_mass = p.sum(dim=-1)
    lse = peak + total_mass.log()
    ce = lse - target_logit
    zero = torch.zeros((), device=logits.device)
    if not distilling:
        if want_grad:
            p.mul_((1.0 / (total_mass * rows_total))[:, None])
            p[rows, targets] -= 1.0 / rows_total
        return ce.sum(), ce.sum(), zero, p if want_grad else None
    labelled = a > 0
    kd, rest_ratio, q_k = _kd_terms(top_logits - lse[:, None], soft_lp, 1.0)
    total = ((1.0 - a) * ce + a * kd).sum()
    if want_grad:
        # rows without soft labels (A = 0) carry placeholders: their ratio is not used
        rest_ratio = torch.where(labelled, rest_ratio, torch.zeros_like(rest_ratio))
        p_k = p.gather(1, soft_ids) / total_mass[:, None]
        p.mul_(((1.0 - a * rest_ratio) / (total_mass * rows_total))[:, None])
        p.scatter_add_(1, soft_ids, a[:, None] * (rest_ratio[:, None] * p_k - q_k) / rows_total)
        p[rows, targets] -= (1.0 - a) / rows_total
    return total, ce.sum(), (kd * labelled).sum(), p if want_grad else None


def _tempered_chunk_loss(logits: torch.Tensor, targets: torch.Tensor, soft_ids: torch.Tensor,
                         soft_lp: torch.Tensor, a: torch.Tensor, t: float, rows_total: int, want_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``_chunk_loss`` at T ≠ 1: the tempered softmax is another softmax than the cross-entropy's, so the KL
    takes its own passes (``_kd_rows``)."""
    lse = torch.logsumexp(logits, dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    ce = lse - logits[rows, targets]
    kd, grad_kd = _kd_rows(logits, soft_ids, soft_lp, t)
    kd = kd * t * t
    total = ((1.0 - a) * ce + a * kd).sum()
    if want_grad:
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad[rows, targets] -= 1.0
        grad.mul_((1.0 - a)[:, None]).add_(grad_kd.mul_((a * t)[:, None])).div_(rows_total)
    return total, ce.sum(), (kd * (a > 0)).sum(), logits if want_grad else None


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, soft_ids: torch.Tensor | None, soft_lp: torch.Tensor | None,
                soft_weight: torch.Tensor | None, distill: Distill | None, chunk_rows: int,
                grad_enabled: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # needs_input_grad follows requires_grad even under no_grad: evaluation would pay for gradients
        want_hidden, want_weight, want_bias = (grad_enabled and w for w in ctx.needs_input_grad[:3])
        want_grad = want_hidden or want_weight or want_bias
        n = hidden.shape[0]
        device_type = hidden.device.type
        # Under autocast, matmuls run in its dtype (and the gradient matmuls follow: they are autocast ops
        # too).
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum, kd_sum = torch.zeros_like(total), torch.zeros_like(total)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        weight_c = weight.to(dtype)  # cast once, not per chunk
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            logits = F.linear(h, weight, bias).float()
            a = soft_weight[rows] if soft_weight is not None else None  # A where a row has soft labels
            chunk_total, chunk_ce, chunk_kd, grad = _chunk_loss(
                logits, targets[rows], soft_ids[rows] if a is not None else None,
                soft_lp[rows] if a is not None else None, a, distill, n, want_grad)
            total += chunk_total
            ce_sum += chunk_ce
            kd_sum += chunk_kd
            if grad is None:
                continue
            if want_bias:
                grad_bias += grad.sum(0)
            grad = grad.to(dtype)
            if want_hidden:
                grad_hidden[rows] = grad @ weight_c
            if want_weight:
                if grad_weight.dtype == dtype == h.dtype:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += grad.t() @ h.to(dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        labelled = (soft_weight > 0).sum() if soft_weight is not None else None
        kd_mean = kd_sum / labelled.clamp(min=1) if labelled is not None else torch.zeros_like(total)
        ce_mean, kd_mean = ce_sum / n, kd_mean
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return total / n, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_loss  # d(final loss) / d(this mean loss): e.g. 1 / grad_accum_steps
        return (grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
                None, None, None, None, None, None, None)


@dataclass
class LossTerms:
    """A step's loss and its parts (the parts detached: for logs)."""

    loss: torch.Tensor
    """(1 − A)·CE + A·T²·KL where soft labels are, CE elsewhere: what is minimised."""
    ce: torch.Tensor
    """The plain cross-entropy of the next token, over every position."""
    kd: torch.Tensor
    """The KL (times T²), over the positions with soft labels."""


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None, soft: SoftLabels | None = None,
                         distill: Distill | None = None) -> LossTerms:
    """Mean of ``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` over all rows, and its gradients,
    without materialising the logits. hidden (..., d), targets (...) of token ids. With ``soft`` (a batch's
    ``SoftLabels``, shaped like ``targets`` plus k) and ``distill``: the distillation loss (module docstring).
    Either way its parts, as ``LossTerms`` (without a teacher the loss is the cross-entropy and the KL 0)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or default_chunk_rows(hidden.device)
    if soft is None or distill is None:
        loss, _, _ = _LinearLoss.apply(hidden, weight, bias, targets, None, None, None, None, rows,
                                       torch.is_grad_enabled())
        return LossTerms(loss, loss.detach(), torch.zeros_like(loss.detach()))
    k = soft.ids.shape[-1]
    weights = soft.mask.reshape(-1).to(torch.float32) * distill.weight
    # widened here, on the training device: the batch travels in the shards' uint16 / float16
    loss, ce, kd = _LinearLoss.apply(hidden, weight, bias, targets, soft.ids.reshape(-1, k).long(),
                                     soft.logprobs.reshape(-1, k).float(), weights, distill, rows,
                                     torch.is_grad_enabled())
    return LossTerms(loss, ce, kd)
