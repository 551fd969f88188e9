"""``fit``: the training loop alone. Everything it works on is set up beforehand and handed over as a ``Run``.

Each step: ``grad_accum_steps`` micro-batches forward and backward, the learning rate of this step, gradient
clipping, one optimizer step; then the step's record (``metrics.jsonl``), a console line every
``log_interval`` steps, an evaluation on the fixed held-out blocks every ``eval_interval`` and a checkpoint
every ``checkpoint_interval``. It stops at the first stop rule that holds and says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed
from ..config import ConfigError
from ..data.pipeline import TrainData
from ..errors import UserError
from ..model.loss import Distill, LossTerms
from . import checkpoint as ckpt
from .config import TrainConfig
from .logs import MetricsLog, format_line
from .metrics import Window, memory_gib, mfu
from .optim import LRSchedule
from .parallelize import gradient_sync
from .state import TrainState

log = logging.getLogger("scratchlm.trainer")


class NonFiniteLoss(UserError, RuntimeError):
    """A NaN or infinite loss or gradient norm, with ``--on-nonfinite-loss stop``."""


class StopRequests:
    """SIGTERM or SIGINT while training (a scheduler's preemption, ``kill``, Ctrl-C): the first asks the loop
    to stop after the step under way, so that a checkpoint is written; a second ends the process at once.
    Installed only in the main thread (the only one that receives signals)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and writing a checkpoint (send it again to stop "
                    "at once)", self.received)
        for sig in self.SIGNALS:  # the second signal: the default action
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Checkpointer:
    """Writes a run's checkpoints (collective under DDP/FSDP; rank 0 writes), never the same one twice."""

    def __init__(self, out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config_yaml: str,
                 keep: int, env: distributed.DistEnv, saved: TrainState | None = None) -> None:
        self.out, self.model, self.optimizer, self.config_yaml = out, model, optimizer, config_yaml
        self.keep, self.env = keep, env
        # What the newest checkpoint holds (a resumed run starts from one): a run that ends on a save step
        # does not write it again.
        self.saved_at = self._key(saved) if saved is not None else None

    def _key(self, state: TrainState) -> tuple[int, str]:
        return state.step, json.dumps(state.data_positions[self.env.rank], sort_keys=True, default=_digest)

    def save(self, state: TrainState) -> None:
        key = self._key(state)
        if key == self.saved_at:
            return
        self.saved_at = key
        state.data_positions = distributed.gather_objects(state.data_positions[self.env.rank], self.env)
        path = ckpt.save_checkpoint(self.out, state.step, self.model, self.optimizer, state.to_dict(),
                                    self.config_yaml, self.keep, self.env.is_main)
        distributed.barrier(self.env)
        log.info("checkpoint saved: %s", path)


def _digest(array) -> str:
    """A numpy array of a data position, for comparing positions."""
    return hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest() + str(array.shape)


@dataclass(kw_only=True)
class Run:
    """What ``fit`` works on, set up by ``trainer.train`` (built by name: fifteen parts)."""

    cfg: TrainConfig
    model: torch.nn.Module
    """The model as wrapped for training (compile, DDP, FSDP); ``model(inputs, targets=...)`` is the loss."""
    optimizer: torch.optim.Optimizer
    data: TrainData
    state: TrainState
    metrics: MetricsLog
    checkpoints: Checkpointer
    device: torch.device
    tokens_per_step: int
    schedule: LRSchedule
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    """fp16: the dynamic loss scaler (the same under DDP and FSDP2, whose gradients it takes as DTensors)."""
    env: distributed.DistEnv = field(default_factory=distributed.DistEnv)
    flops_per_token: float = 0.0
    peak: tuple[str, float] | None = None
    """(card, peak bf16 FLOP/s) for MFU on a known GPU."""
    stop_requests: StopRequests = field(default_factory=StopRequests)


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    data_seconds: float
    epoch: int
    teacher_share: float | None = None
    """Share of the step's tokens a teacher wrote (training from a feed)."""
    distilled: dict | None = None
    """Distilling: the step's ``ce_loss``, ``kd_loss`` and ``soft_label_share`` (of its targets)."""


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def block_losses(model: torch.nn.Module, blocks: torch.Tensor, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean token loss of each held-out block (float64, on the CPU).

    A block at a time, through the model's chunked head + loss (``model(idx, targets)``): the logits of a
    micro-batch of blocks (8 x 512 x 51,200 floats for phi-tiny) would be 0.8 GB, and 3x that at the peak.
    """
    was_training = model.training
    model.eval()
    losses = []
    for block in blocks:
        block = block.to(device).unsqueeze(0)
        with autocast(device, amp_dtype):
            losses.append(model(block[:, :-1], block[:, 1:]).loss.double().cpu())
    model.train(was_training)
    return torch.stack(losses)


def evaluate(run: Run) -> float:
    """The held-out loss now (overall, and per source for a mix), logged and recorded."""
    state, data = run.state, run.data
    # Every rank holds the same evaluation set; the mean over ranks only evens out numerical noise.
    losses = block_losses(run.model, data.eval_set, run.device, run.amp_dtype)
    losses = distributed.mean(losses.to(run.device), run.env).cpu()
    loss = losses.mean().item()
    rec = {"step": state.step, "tokens": state.tokens, "elapsed_s": state.elapsed_s, "eval_loss": loss,
           "eval_ppl": math.exp(min(loss, 50.0))}
    by_source = ""
    if data.eval_groups:
        rec["eval_loss_by_source"] = {name: losses[a:b].mean().item() for name,
                                      (a, b) in data.eval_groups.items()}
        by_source = " (" + ", ".join(f"{n} {v:.4f}" for n, v in rec["eval_loss_by_source"].items()) + ")"
    run.metrics.write(rec)
    log.info("eval at step %d: loss %.4f, perplexity %.2f%s", state.step, loss, rec["eval_ppl"], by_source)
    return loss


def _set_target(run: Run) -> None:
    """The initial evaluation, and the target loss it implies (a fresh run); a given target on resume."""
    cfg, state = run.cfg, run.state
    if state.initial_eval_loss is None:
        state.initial_eval_loss = evaluate(run)
        if cfg.target_loss is not None:
            auto = cfg.target_loss == "auto"
            state.target_loss = state.initial_eval_loss - 1.0 if auto else float(cfg.target_loss)
            log.info("target loss: %.4f (%s)", state.target_loss,
                     "initial evaluation loss - 1" if auto else "given")
    elif cfg.target_loss is not None and cfg.target_loss != "auto":
        state.target_loss = float(cfg.target_loss)


def stop_reason(run: Run) -> str | None:
    """Why the run should stop before the next step, if it should (taken together on every rank)."""
    cfg, state = run.cfg, run.state
    signalled = run.stop_requests.received is not None
    if run.env.enabled:  # every rank stops together (a signal may reach some ranks only)
        signalled = distributed.any_rank(signalled, run.env, run.device)
    if signalled:
        return f"stopped by {run.stop_requests.received or 'a signal to another rank'}"
    if cfg.max_steps is not None and state.step >= cfg.max_steps:
        return f"max_steps {cfg.max_steps} reached"
    if cfg.max_tokens is not None and state.tokens >= cfg.max_tokens:
        return f"max_tokens {cfg.max_tokens:,} reached"
    if cfg.max_time is not None and distributed.any_rank(state.elapsed_s >= cfg.max_time, run.env,
                                                         run.device):
        return f"max_time {cfg.max_time:.0f} s reached"
    return None


def train_step(run: Run) -> StepResult | None:
    """One optimizer step over ``grad_accum_steps`` micro-batches; None if it was skipped (non-finite)."""
    cfg, state = run.cfg, run.state
    t0 = time.perf_counter()
    data_s, shares = 0.0, []
    loss_sum = torch.zeros((), device=run.device)
    parts = torch.zeros(3, device=run.device)  # distilling: ce, kd, share of targets with soft labels
    distill = Distill(cfg.distill_weight, cfg.distill_temperature) if cfg.distill_weight > 0 else None
    for micro in range(cfg.grad_accum_steps):
        td = time.perf_counter()
        batch = next(run.data.batches)
        inputs = batch.inputs.to(run.device, non_blocking=True)
        targets = batch.targets.to(run.device, non_blocking=True)
        soft = batch.soft.to(run.device) if distill is not None and batch.soft is not None else None
        data_s += time.perf_counter() - td
        shares.append(batch.teacher_share)
        with autocast(run.device, run.amp_dtype):
            # head + loss in chunks: no full logits tensor
            terms: LossTerms = run.model(inputs, targets=targets, soft=soft, distill=distill)
        loss = terms.loss
        # Gradients are reduced across ranks after the last micro-batch only.
        with gradient_sync(run.model, last=micro == cfg.grad_accum_steps - 1):
            scaled = loss / cfg.grad_accum_steps
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach()
        if distill is not None:
            # a batch without soft labels (a source that has none): plain cross-entropy, its KL 0
            labelled = soft.mask.float().mean() if soft is not None else torch.zeros_like(terms.ce)
            parts += torch.stack([terms.ce, terms.kd, labelled])
    lr = run.schedule.at(state.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # the true gradients, for clipping and the norm
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
        grad_norm = grad_norm.full_tensor()
    # The means over ranks: with equal batches, the loss (and teacher share) of the global batch. One
    # collective and one device sync, here.
    from_feed = None not in shares
    share = sum(shares) / len(shares) if from_feed else 0.0
    sums = torch.cat([torch.stack([loss_sum, torch.tensor(share * cfg.grad_accum_steps, device=run.device)]),
                      parts])
    means = distributed.mean(sums / cfg.grad_accum_steps, run.env).tolist()
    step_loss, teacher_share = means[0], means[1] if from_feed else None
    distilled = (dict(zip(("ce_loss", "kd_loss", "soft_label_share"), means[2:], strict=True))
                 if distill is not None else None)
    norm = grad_norm.item()
    state.data_positions[run.env.rank] = batch.position
    if run.scaler is not None and math.isfinite(step_loss) and not math.isfinite(norm):
        return _overflowed(run)
    if not (math.isfinite(step_loss) and math.isfinite(norm)):
        run.optimizer.zero_grad(set_to_none=True)
        if cfg.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"non-finite loss ({step_loss}) or gradient norm ({norm}) at step "
                                f"{state.step + 1}; stopped. The last checkpoint is intact: lower --lr or "
                                "use --on-nonfinite-loss skip, then --resume auto")
        state.skipped_steps += 1
        log.warning("skipped step %d: non-finite loss or gradient", state.step + 1)
        return None
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        state.loss_scaler = run.scaler.state_dict()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += run.tokens_per_step
    state.loss_smooth = step_loss if state.loss_smooth is None else 0.9 * state.loss_smooth + 0.1 * step_loss
    return StepResult(step_loss, lr, norm, time.perf_counter() - t0, data_s, batch.epoch, teacher_share,
                      distilled)


def _overflowed(run: Run) -> StepResult | None:
    """fp16: gradients that overflowed at this loss scale. The scaler skips the update and halves the scale;
    the data of the step is spent (as a skipped step's is), the step counted and logged."""
    run.scaler.step(run.optimizer)  # finds the infinities and does not step
    scale = run.scaler.get_scale()
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state = run.state
    state.overflow_steps += 1
    state.loss_scaler = run.scaler.state_dict()
    log.warning("step %d skipped: gradients overflowed in fp16 at loss scale %g (now %g; %d overflows so "
                "far)", state.step + 1, scale, run.scaler.get_scale(), state.overflow_steps)
    run.metrics.write({"step": state.step, "event": "fp16_overflow", "loss_scale": scale,
                       "overflow_steps": state.overflow_steps})
    return None


class StepLog:
    """The step records and console lines: a window of throughput between lines, the epoch last shown."""

    def __init__(self, run: Run) -> None:
        self.run, self.window, self.epoch_shown = run, Window(), -1
        self.bar = tqdm(total=run.cfg.max_steps, initial=run.state.step, desc="training", unit="step",
                        dynamic_ncols=True, disable=not (sys.stderr.isatty() and run.env.is_main))

    def record(self, step: StepResult) -> None:
        run, state = self.run, self.run.state
        self.window.add(run.tokens_per_step, step.seconds, step.data_seconds)
        tps = run.tokens_per_step / step.seconds
        rec = {"step": state.step, "loss": step.loss, "lr": step.lr, "grad_norm": step.grad_norm,
               "tokens": state.tokens, "tokens_per_s": tps,
               "tokens_per_s_per_device": tps / run.env.world_size,
               "elapsed_s": state.elapsed_s, "epoch": step.epoch, "step_time_s": step.seconds,
               "data_wait_s": step.data_seconds}
        if run.peak:
            rec["mfu"] = mfu(run.flops_per_token, tps, run.peak[1], run.env.world_size)
        if step.teacher_share is not None:
            rec["teacher_token_share"] = step.teacher_share
        rec.update(step.distilled or {})
        run.metrics.write(rec)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step.loss:.3f}", tok_s=f"{tps:,.0f}")
        if state.step % run.cfg.log_interval == 0:
            self._line(rec)

    def _line(self, rec: dict) -> None:
        run = self.run
        line = {**rec, "loss_smooth": run.state.loss_smooth, "tokens_per_s": self.window.tokens_per_s,
                "data_wait": self.window.data_wait_share, "mem_gib": memory_gib(run.device),
                "iter": rec["step"] * run.cfg.grad_accum_steps - 1, "max_steps": run.cfg.max_steps,
                "epoch_start": rec["epoch"] != self.epoch_shown, "peak": run.peak[0] if run.peak else None}
        self.epoch_shown = rec["epoch"]
        log.info(format_line(run.cfg.log_format, line))
        self.window.reset()

    def close(self) -> None:
        self.bar.close()


def _evaluate_and_check_target(run: Run) -> str | None:
    """An evaluation; 'target loss reached' when it ends the run."""
    eval_loss = evaluate(run)
    state = run.state
    if not state.record_target(eval_loss):
        return None
    run.metrics.write({"step": state.step, "event": "target_reached", "target_loss": state.target_loss,
                       "eval_loss": eval_loss, "tokens": state.tokens, "elapsed_s": state.elapsed_s})
    log.info("target reached: eval loss %.4f <= %.4f at step %d, %s tokens, %.1f s", eval_loss,
             state.target_loss,
             state.step, f"{state.tokens:,}", state.elapsed_s)
    return None if run.cfg.continue_after_target else "target loss reached"


def fit(run: Run) -> str:
    """Train until a stop rule holds; returns why it stopped. The caller evaluates, saves and exports
    after."""
    cfg, state = run.cfg, run.state
    _set_target(run)
    steps = StepLog(run)
    session_start, elapsed_before = time.perf_counter(), state.elapsed_s
    run.model.train()
    try:
        while (reason := stop_reason(run)) is None:
            step = train_step(run)
            if step is None:
                continue
            state.elapsed_s = elapsed_before + (time.perf_counter() - session_start)
            steps.record(step)
            if state.step % cfg.eval_interval == 0 and (reason := _evaluate_and_check_target(run)):
                break
            if state.step % cfg.checkpoint_interval == 0:
                run.checkpoints.save(state)
    except torch.OutOfMemoryError:
        raise ConfigError(f"out of memory at step {state.step + 1} with micro-batch {cfg.micro_batch_size} × "
                          f"{cfg.resolved_block_size()} tokens: lower --micro-batch-size (raise "
                          "--grad-accum-steps to keep the batch) or add --activation-checkpointing") from None
    finally:
        steps.close()
        run.data.close()
    return reason
