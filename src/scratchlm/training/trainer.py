"""``scratchlm train``: pretrain a Phi model from random weights, with full logs and exact resume.

``train(cfg)`` reads top to bottom: the run folder and logging, the resume point, the data (``build_data``),
the model wrapped for parallelism and its optimizer, ``fit`` (the loop), then a last evaluation and
checkpoint, the final model in Hugging Face format and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .. import distributed
from ..config import ConfigError, read_yaml, to_yaml
from ..data.pipeline import build_data
from ..devices import pick_device
from ..errors import UserError
from ..model.hf import phi_from_weights, save_hf
from ..model.model import Phi
from ..tokenizer import Tokenizer, load_tokenizer
from . import checkpoint as ckpt
from .config import RESUMABLE_CHANGES, TrainConfig
from .logs import (
    METRICS_FILE,
    MetricsLog,
    close_logging,
    copy_metrics,
    last_eval,
    setup_logging,
    truncate_metrics,
)
from .loop import Checkpointer, NonFiniteLoss, Run, evaluate, fit
from .metrics import gpu_peak_flops
from .optim import LRSchedule, build_optimizer, decay_branch, run_length, schedule_for
from .parallelize import parallelize, resolve_strategy
from .state import TrainState

log = logging.getLogger("scratchlm.trainer")

__all__ = ["Interrupted", "NonFiniteLoss", "TrainConfig", "train"]


class Interrupted(UserError):
    """Training stopped by SIGTERM or SIGINT, after writing a checkpoint."""

    exit_status = 75  # EX_TEMPFAIL: "try again later", what a scheduler's requeue wants to see


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the final summary (also written to ``summary.json``).

    Under ``torchrun`` every process calls this; they join one process group and train one model together.
    """
    cfg.check()
    out = Path(cfg.out)
    _check_writable(out)
    device = pick_device(cfg.device, distributed.local_rank())
    env = distributed.init(device.type)
    handlers = setup_logging(out, env)
    try:
        return _train(cfg, out, device, env)
    finally:
        close_logging(handlers)
        distributed.shutdown(env)


def _check_writable(out: Path) -> None:
    """Fail now, with one clear line, if the run folder cannot be written (a full disk, no permission), rather
    than at the first log line or checkpoint."""
    probe = out / ".write-check"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise ConfigError(f"cannot write to the run folder {out}: {err.strerror}") from None


def _resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    existing = ckpt.latest_checkpoint(out)
    if cfg.resume_from is not None and existing is None:
        return _trusted(Path(cfg.resume_from), "--resume-from")
    if cfg.resume is None:
        if existing is not None:
            raise ConfigError(f"{out} already holds checkpoints of a run; pass --resume auto to continue it, "
                              "or choose another --out")
        return None
    if cfg.resume == "auto":
        if existing is None:
            return None
        newest, skipped = ckpt.latest_verified(out)
        for path, reason in skipped:
            log.warning("skipping checkpoint %s: %s", path.name, reason)
        if newest is None:
            raise ConfigError(f"no checkpoint in {out} can be trusted ("
                              + "; ".join(f"{p.name}: {r}" for p, r in skipped) + ")")
        return newest
    return _trusted(Path(cfg.resume), "--resume")


def _trusted(path: Path, flag: str) -> Path:
    """``path`` if it is a complete checkpoint that verifies."""
    if not (path / "state.json").exists():
        raise ConfigError(f"{flag} {path}: not a checkpoint folder (no state.json)")
    if (reason := ckpt.verify(path)) is not None:
        raise ConfigError(f"{flag} {path}: this checkpoint cannot be trusted: {reason}")
    return path


def _branch(cfg: TrainConfig, checkpoint: Path | None, out: Path) -> dict | None:
    """Where this run branched off another (``--resume-from``), read from the checkpoint it starts from: the
    parent's checkpoint (a new branch) or its own (a branch resumed)."""
    if checkpoint is None or cfg.resume_from is None:
        return None
    saved = json.loads((checkpoint / "state.json").read_text())
    if checkpoint.parent.parent.resolve() == out.resolve():
        return saved.get("branch")
    parent = TrainConfig.model_validate(read_yaml(checkpoint / "config.yaml"))
    step, tokens_per_step = saved["step"], saved["tokens"] // max(1, saved["step"])
    rate = schedule_for(parent, run_length(parent, tokens_per_step)).at(step)
    return {"checkpoint": str(checkpoint), "step": step, "lr": rate}


def _schedule(cfg: TrainConfig, branch: dict | None, tokens_per_step: int) -> LRSchedule:
    if branch is not None and cfg.decay_steps is not None:
        return decay_branch(cfg, branch["step"], branch["lr"], cfg.decay_steps)
    return schedule_for(cfg, run_length(cfg, tokens_per_step))


def _warn_changed_settings(cfg: TrainConfig, checkpoint: Path) -> None:
    saved = read_yaml(checkpoint / "config.yaml")
    changed = {k for k, v in cfg.model_dump(mode="json").items() if saved.get(k) != v} - RESUMABLE_CHANGES
    if changed:
        log.warning("resuming with changed settings %s (was %s)", sorted(changed),
                    {k: saved.get(k) for k in sorted(changed)})


def _build_model(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None,
                 env: distributed.DistEnv) -> torch.nn.Module:
    """A fresh model (the same seed on every rank: the same initial weights), wrapped for this world size."""
    model_cfg = cfg.preset()
    torch.manual_seed(cfg.seed)
    model = Phi(model_cfg).to(device)
    try:
        strategy = resolve_strategy(cfg.strategy, env.world_size, model_cfg.num_parameters)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    peak = gpu_peak_flops(device)
    log.info("model %s: %s parameters on %s, %s, %s%s", model_cfg.name, f"{model_cfg.num_parameters:,}",
             device,
             f"{str(amp_dtype).removeprefix('torch.')} autocast" if amp_dtype else "fp32",
             f"{strategy} over {env.world_size} processes" if env.enabled else "one process",
             f" (MFU per device against {peak[0]} peak {peak[1] / 1e12:.0f} TFLOP/s)" if peak else "")
    return parallelize(model, cfg.activation_checkpointing, cfg.compile, strategy, device,
                       param_dtype=amp_dtype,
                       reduce_fp32=cfg.fsdp_reduce_fp32)


def _restore(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path,
             env: distributed.DistEnv, branch: dict | None) -> TrainState:
    state = TrainState.from_dict(ckpt.load_checkpoint(checkpoint, model, optimizer))
    if len(state.data_positions) != env.world_size:
        raise ConfigError(f"{checkpoint} was saved by {len(state.data_positions)} processes; resume it with "
                          f"the same number (this run has {env.world_size}) so every data stream continues")
    new_branch = branch is not None and state.branch != branch
    if env.is_main and new_branch:  # the parent's history up to the branch: the new run's curve is whole
        copy_metrics(checkpoint.parent.parent / METRICS_FILE, out / METRICS_FILE, state.step)
    elif env.is_main:
        truncate_metrics(out / METRICS_FILE, state.step)
    state.branch = branch
    shown = {k: (f"array of {v.shape}" if hasattr(v, "shape") else v) for k,
             v in state.data_positions[env.rank].items()}
    log.info("resumed from %s: step %d, %s tokens, data at %s", checkpoint, state.step, f"{state.tokens:,}",
             shown)
    return state


def _train(cfg: TrainConfig, out: Path, device: torch.device, env: distributed.DistEnv) -> dict:
    block_size = cfg.resolved_block_size()
    resume_from = _resume_point(cfg, out)
    branch = _branch(cfg, resume_from, out)
    if resume_from is not None and branch is None:
        _warn_changed_settings(cfg, resume_from)
    if branch is not None and cfg.decay_steps is not None and cfg.max_steps is None:
        cfg = cfg.model_copy(update={"max_steps": branch["step"] + cfg.decay_steps})
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * block_size * env.world_size
    # The run as planned (its schedule's length): a feed's buffer holds no more than the rest of it needs.
    planned = cfg.lr_decay_steps or run_length(cfg, tokens_per_step)
    request = cfg.data_request(progress=sys.stderr.isatty(),
                               run_batches=planned * cfg.grad_accum_steps if planned else None)
    config_yaml = to_yaml(cfg)
    if env.is_main:
        ckpt.remove_partial(out)
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    amp_dtype = cfg.autocast_dtype(device)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = _build_model(cfg, device, amp_dtype, env)
    optimizer = build_optimizer(model, cfg, device)
    state = (_restore(resume_from, model, optimizer, out, env, branch) if resume_from is not None
             else TrainState.start(env.world_size))
    data = build_data(request, tokenizer, env, state.data_positions[env.rank])
    metrics = MetricsLog(out, env.is_main, cfg.tensorboard, cfg.wandb, cfg.model_dump(mode="json"))
    checkpoints = Checkpointer(out, model, optimizer, config_yaml, cfg.keep_checkpoints, env,
                               saved=state if resume_from is not None else None)
    run = Run(cfg=cfg, model=model, optimizer=optimizer, data=data, state=state, metrics=metrics,
              checkpoints=checkpoints, device=device, tokens_per_step=tokens_per_step,
              schedule=_schedule(cfg, branch, tokens_per_step), amp_dtype=amp_dtype,
              scaler=_loss_scaler(cfg, amp_dtype, device, state), env=env,
              flops_per_token=cfg.preset().flops_per_token(block_size), peak=gpu_peak_flops(device))
    try:
        with run.stop_requests:
            reason = fit(run)
        log.info("stopping: %s", reason)
        signalled = reason.startswith("stopped by")
        final_eval = evaluate(run) if state.step % cfg.eval_interval and not signalled else None
    finally:
        run.metrics.close()
    run.checkpoints.save(state)
    if signalled:  # a preempted job has seconds left: the checkpoint, not the export
        raise Interrupted(f"{reason} at step {state.step}: checkpoint written to {out / 'checkpoints'}; "
                          "continue with --resume auto")
    return _export(run, out, tokenizer, reason, final_eval)


def _loss_scaler(cfg: TrainConfig, amp_dtype: torch.dtype | None, device: torch.device,
                 state: TrainState) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaler, as it stood at the checkpoint when resuming; None in bf16 and fp32."""
    if amp_dtype != torch.float16:
        return None
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.loss_scale)
    if state.loss_scaler:
        scaler.load_state_dict(state.loss_scaler)
    return scaler


def _export(run: Run, out: Path, tokenizer: Tokenizer, reason: str, final_eval: float | None) -> dict:
    """The final model in Hugging Face format and the summary (rank 0); every rank leaves together."""
    state, env = run.state, run.env
    weights = ckpt.full_weights(run.model)  # collective under FSDP
    if not env.is_main:
        # leave together: a rank that exits early can break rank 0's last collectives
        distributed.barrier(env)
        return {"reason": reason, "steps": state.step, "main": False}
    model_cfg = run.cfg.preset()
    final_dir = save_hf(phi_from_weights(model_cfg, weights), out / "final",
                        trained_block_size=run.cfg.resolved_block_size())
    tokenizer.save(final_dir)
    summary = {"reason": reason, "model": model_cfg.name, "parameters": model_cfg.num_parameters,
               "steps": state.step, "tokens": state.tokens, "elapsed_s": state.elapsed_s,
               "initial_eval_loss": state.initial_eval_loss, "target_loss": state.target_loss,
               "target_reached": state.target_reached,
               "final_eval_loss": final_eval if final_eval is not None else last_eval(out / METRICS_FILE),
               "skipped_steps": state.skipped_steps, "overflow_steps": state.overflow_steps,
               "lr_schedule": asdict(run.schedule),
               "branch": state.branch,
               "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s else 0.0,
               "final": str(final_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("wrote %s (Hugging Face format) and %s", final_dir, out / "summary.json")
    distributed.barrier(env)
    return summary


def run_train(cfg: TrainConfig) -> None:
    """The ``train`` command: train, then print the summary (rank 0 alone, under torchrun)."""
    summary = train(cfg)
    if summary.get("main", True):
        print(json.dumps(summary, indent=2))
