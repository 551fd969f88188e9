"""``scratchlm train``: pretrain a Phi model from random weights, with full logs and exact resume.

setup (config, data, model, optimizer, resume) → fit (the step loop: stop rules, logs, evaluation,
checkpoints) → final export in Hugging Face format.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import ConfigBase, ConfigError, add_arguments, load, overrides_from_args, read_yaml, to_yaml
from .data import (
    Batch,
    BlockLoader,
    DataError,
    DataPosition,
    MixedBlockLoader,
    eval_blocks,
    parse_data_list,
    prefetch,
    tokenize_corpus,
)
from .metrics import Window, gpu_peak_flops, memory_gib, mfu
from .model.config import ModelConfig, get_preset
from .model.hf import phi_from_weights, save_hf
from .model.model import Phi
from .parallelize import parallelize, resolve_strategy
from .tokenizer import load_tokenizer

log = logging.getLogger("scratchlm.trainer")


class TrainConfig(ConfigBase):
    """Everything a training run needs; saved as ``config.yaml`` in the run folder and in every checkpoint."""

    model: str = "phi-tiny"
    """Model preset (see `scratchlm model-info --list`)."""
    data: str | None = None
    """Training text: a folder, .zip, .txt, .jsonl(.gz), .parquet, or a feed URL http(s)://host:port
    (default: $SCRATCHLM_DATA). A mix: PATH:WEIGHT,PATH:WEIGHT (relative weights: shares of training blocks;
    evaluation losses are also logged per source)."""
    feed_url: str | None = None
    """The seed's setting: a feed server URL to train from (same as --data http://...)."""
    feed_api_key_file: str | None = None
    """File holding the feed's API key (else $SCRATCHLM_API_KEY)."""
    feed_texts_per_request: int = 16
    """Texts asked of the feed per request (4 requests are prefetched)."""
    out: str = "runs/train"
    """Run folder: logs, metrics.jsonl, checkpoints/, final/."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: $SCRATCHLM_TOKENIZER, else microsoft/phi-2)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_tokens: int | None = None
    """Stop after this many training tokens."""
    max_time: float | None = None
    """Stop after this many seconds of training (summed over resumed sessions)."""
    target_loss: Literal["auto"] | float | None = None
    """Stop when the evaluation loss reaches this; 'auto' = the initial evaluation loss minus 1."""
    continue_after_target: bool = False
    """Log the target when reached but keep training until another stop rule."""
    resume: str | None = None
    """'auto' = continue from the newest complete checkpoint in the run folder (if any); or a checkpoint path."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (global batch = micro_batch_size × grad_accum_steps × ranks)."""
    block_size: int | None = None
    """Tokens per training sequence (default: the model's block size)."""
    lr: float = 6e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""
    lr_decay_steps: int | None = None
    """Steps of warmup + cosine decay (default: max_steps, else max_tokens / tokens per step; else constant lr)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices and embeddings only (not biases, not LayerNorm)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 1337
    """Seed for weight init and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; 'auto' = cuda if available."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'bf16' = bf16 autocast with fp32 weights; 'auto' = bf16 on a GPU that supports it, fp32 on CPU."""
    compile: bool = False
    """torch.compile each block."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    """Data parallelism under torchrun: DDP (replicas) or FSDP2 (sharded); 'auto' = single for one process, FSDP
    from 1B parameters, else DDP."""
    fsdp_reduce_fp32: bool = True
    """With FSDP and bf16: reduce gradients in fp32 (more exact, twice the traffic) rather than bf16."""
    eval_interval: int = 50
    """Evaluate on the held-out set every this many steps (also before step 1 and at the end)."""
    eval_batches: int = 8
    """Micro-batches in each evaluation (always the same held-out blocks)."""
    eval_fraction: float = 0.005
    """Share of documents held out for evaluation (fixed by a hash of each document's id)."""
    chunk_chars: int = 8000
    """Text files are cut into documents of at most this many characters at paragraph breaks."""
    log_interval: int = 1
    """Write a console/train.log line every this many steps (metrics.jsonl gets every step)."""
    log_format: Literal["default", "seed", "litgpt"] = "default"
    """Console line style: ours, the seed's 'Epoch: … Step count: … loss = …', or litgpt's 'iter … step …'."""
    checkpoint_interval: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop with a message (the last checkpoint stays intact) or skip the step."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run folder (needs the tensorboard package)."""


# ---------------------------------------------------------------------------------------------------------------
# Pieces with arithmetic worth testing on their own


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear weights, embedding) only; biases and LayerNorm parameters get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def format_line(fmt: str, rec: dict) -> str:
    """One console/train.log line for a step record, in the chosen style."""
    if fmt == "seed":
        head = f"Epoch: {rec['epoch']:04d}" if rec.get("epoch_start") else "\t\t"
        return f"{head} Step count:  {rec['step']} loss = {rec['loss']:.6f}"
    if fmt == "litgpt":
        return (f"iter {rec['iter']} step {rec['step']}: loss {rec['loss']:.4f}, LR: {rec['lr']:.6f}, "
                f"iter time: {rec['step_time_s'] * 1000:.2f}ms (optimizer.step)")
    mfu_text = f"MFU {rec['mfu'] * 100:.1f}% of {rec['peak']}" if rec.get("mfu") is not None else "MFU n/a"
    total = f"/{rec['max_steps']}" if rec.get("max_steps") else ""
    return (f"step {rec['step']}{total} | epoch {rec['epoch']} | loss {rec['loss']:.4f} (smoothed "
            f"{rec['loss_smooth']:.4f}) | lr {rec['lr']:.2e} | grad norm {rec['grad_norm']:.3f} | tokens "
            f"{rec['tokens']:,} | {rec['tokens_per_s']:,.0f} tok/s | {mfu_text} | data wait "
            f"{rec['data_wait'] * 100:.1f}% | mem {rec['mem_gib']:.2f} GiB")


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Setup


def _setup_logging(out: Path, env: distributed.DistEnv) -> list[logging.Handler]:
    """Console (above the progress bar) and DIR/train.log for every scratchlm logger (train, data, feed).

    Only rank 0 logs; other ranks report warnings alone, on stderr, marked with their rank.
    """
    root = logging.getLogger("scratchlm")
    root.propagate = False
    if not env.is_main:
        root.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(message)s"))
        root.addHandler(handler)
        return [handler]
    root.setLevel(logging.INFO)

    class TqdmHandler(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stdout)

    handlers: list[logging.Handler] = [TqdmHandler(), logging.FileHandler(out / "train.log", encoding="utf-8")]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    return handlers


def resolve_device(cfg: TrainConfig, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for fp32); under torchrun each process takes the GPU of its local rank."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available")
    kind = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device if cfg.device != "auto" else "cpu"
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if cfg.precision == "bf16":
        return device, torch.bfloat16
    if cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, None


def _check_stop_rules(cfg: TrainConfig) -> None:
    if not any(x is not None for x in (cfg.max_steps, cfg.max_tokens, cfg.max_time, cfg.target_loss)):
        raise ConfigError("no stop rule: give --max-steps, --max-tokens, --max-time or --target-loss")
    for name in ("micro_batch_size", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval",
                 "checkpoint_interval"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"key '{name}' must be at least 1 (got {getattr(cfg, name)})")


# Settings that only say when to stop or how to log may change on resume; the rest would change the run.
RESUMABLE_CHANGES = {"max_steps", "max_tokens", "max_time", "target_loss", "continue_after_target", "resume",
                     "log_interval", "log_format", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                     "tensorboard", "compile", "activation_checkpointing", "device", "out", "data", "tokenizer"}


def _resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    existing = ckpt.latest_checkpoint(out)
    if cfg.resume is None:
        if existing is not None:
            raise ConfigError(f"{out} already holds checkpoints of a run; pass --resume auto to continue it, "
                              "or choose another --out")
        return None
    if cfg.resume == "auto":
        return existing
    path = Path(cfg.resume)
    if not (path / "state.json").exists():
        raise ConfigError(f"--resume {cfg.resume}: not a checkpoint folder (no state.json)")
    return path


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from, so no step appears twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    ckpt_text = "".join(line + "\n" for line in kept)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(ckpt_text, encoding="utf-8")
    tmp.replace(path)


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device,
             amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Mean token loss of each of the fixed held-out blocks (float64, on the CPU; every block has T tokens, so
    their mean is the mean token loss)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)
        with _autocast(device, amp_dtype):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # (b, T)
        losses.append(loss.double().mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(losses)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the final summary (also written to ``summary.json``).

    Under ``torchrun`` every process calls this; they join one process group and train one model together.
    """
    import os

    _check_stop_rules(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    env = distributed.init("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    handlers = _setup_logging(out, env)
    try:
        return _run(cfg, out, os.environ.get("SCRATCHLM_DATA"), env)
    finally:
        for h in handlers:
            logging.getLogger("scratchlm").removeHandler(h)
            h.close()
        distributed.shutdown(env)


def _run(cfg: TrainConfig, out: Path, env_data: str | None, env: distributed.DistEnv) -> dict:
    model_cfg: ModelConfig = get_preset(cfg.model)
    block_size = cfg.block_size or model_cfg.block_size
    if block_size > model_cfg.block_size:
        raise ConfigError(f"block_size {block_size} exceeds {cfg.model}'s maximum of {model_cfg.block_size}")
    data_source = cfg.feed_url or cfg.data or env_data
    if not data_source:
        raise ConfigError("no training data: pass --data PATH or set SCRATCHLM_DATA")
    resume_from = _resume_point(cfg, out)
    if resume_from is not None:
        saved = read_yaml(resume_from / "config.yaml")
        changed = {k for k, v in cfg.model_dump(mode="json").items() if saved.get(k) != v} - RESUMABLE_CHANGES
        if changed:
            log.warning("resuming with changed settings %s (was %s)", sorted(changed),
                        {k: saved.get(k) for k in sorted(changed)})
    config_yaml = to_yaml(cfg)
    if env.is_main:
        ckpt.remove_partial(out)
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")

    device, amp_dtype = resolve_device(cfg, env.local_rank)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    n_eval_blocks = cfg.eval_batches * cfg.micro_batch_size
    eval_groups: dict[str, tuple[int, int]] = {}  # source name → its rows of the evaluation set (a mix only)
    is_feed = data_source.startswith(("http://", "https://"))
    if is_feed:
        from .feed.client import client_from_env

        client = client_from_env(data_source, cfg.feed_api_key_file)
        # Held-out documents come from the server: never part of its training stream.
        val_tokens = tokenizer.encode_documents(client.heldout(size=1024))
        eval_set = eval_blocks(val_tokens, block_size, n_eval_blocks)
        log.info("data: feed %s; %s held-out tokens from the server", data_source, f"{len(val_tokens):,}")
    else:
        sources = parse_data_list(data_source)
        if not env.is_main:
            distributed.barrier(env)  # rank 0 tokenizes into the cache first; the others then read it
        corpora = [tokenize_corpus(source.path, tokenizer, chunk_chars=cfg.chunk_chars, eval_fraction=cfg.eval_fraction,
                                   progress=sys.stderr.isatty() and env.is_main) for source in sources]
        if env.is_main:
            distributed.barrier(env)
        total_weight = sum(source.weight for source in sources)
        eval_parts = []
        for source, corpus in zip(sources, corpora, strict=True):
            share = f" at {source.weight / total_weight:.1%} of training blocks" if len(sources) > 1 else ""
            log.info("data: %s%s: %s train tokens, %s held-out tokens (%d documents); files skipped: %s",
                     source.path, share, f"{corpus.meta['train_tokens']:,}", f"{corpus.meta['val_tokens']:,}",
                     corpus.meta["val_documents"], corpus.stats["skipped"] or "none")
            # Each source's held-out blocks in proportion to its weight (at least one), kept apart for per-source
            # losses: with a mix, the overall figure hides which source is learnt.
            n = n_eval_blocks if len(sources) == 1 else max(1, round(n_eval_blocks * source.weight / total_weight))
            try:
                eval_parts.append(eval_blocks(corpus.val, block_size, n))
            except DataError as err:  # name the corpus: in a mix, which one is too small is the whole question
                raise DataError(f"{source.path}: {err}") from None
        eval_set = torch.cat(eval_parts)
        if len(sources) > 1:
            bounds = torch.tensor([0] + [len(p) for p in eval_parts]).cumsum(0).tolist()
            eval_groups = {source.name: (bounds[k], bounds[k + 1]) for k, source in enumerate(sources)}

    model = Phi(model_cfg).to(device)  # same seed on every rank: the same initial weights
    peak = gpu_peak_flops(device)
    try:
        strategy = resolve_strategy(cfg.strategy, env.world_size, model_cfg.num_parameters)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    log.info("model %s: %s parameters on %s, %s, %s%s", model_cfg.name, f"{model_cfg.num_parameters:,}", device,
             "bf16 autocast" if amp_dtype else "fp32",
             f"{strategy} over {env.world_size} processes" if env.enabled else "one process",
             f" (MFU per device against {peak[0]} peak {peak[1] / 1e12:.0f} TFLOP/s)" if peak else "")
    train_model = parallelize(model, cfg.activation_checkpointing, cfg.compile, strategy, device,
                              param_dtype=amp_dtype, reduce_fp32=cfg.fsdp_reduce_fp32)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")

    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * block_size * env.world_size
    decay_steps = cfg.lr_decay_steps or cfg.max_steps or (cfg.max_tokens // tokens_per_step if cfg.max_tokens else None)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "data_positions": [{}] * env.world_size,
             "initial_eval_loss": None, "target_loss": None, "target_reached": None, "loss_smooth": None,
             "skipped_steps": 0}
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, train_model, optimizer))
        if len(state["data_positions"]) != env.world_size:
            raise ConfigError(f"{resume_from} was saved by {len(state['data_positions'])} processes; resume it with "
                              f"the same number (this run has {env.world_size}) so every data stream continues")
        if env.is_main:
            _truncate_metrics(out / "metrics.jsonl", state["step"])
        shown = {k: (f"{len(v)} tokens" if k == "leftover" else v)
                 for k, v in state["data_positions"][env.rank].items()}
        log.info("resumed from %s: step %d, %s tokens, data at %s", resume_from, state["step"],
                 f"{state['tokens']:,}", shown)

    if is_feed:
        from .feed.client import FeedBlockLoader

        batches: Generator[Batch, None, None] = iter(FeedBlockLoader(
            client, tokenizer, block_size, cfg.micro_batch_size, state["data_positions"][env.rank],
            cfg.feed_texts_per_request, rank=env.rank, world_size=env.world_size))
    elif len(corpora) > 1:
        if "index" in state["data_positions"][env.rank]:
            raise DataError("this run was saved training on one corpus and --data now lists several: resume with "
                            "the same --data")
        batches = prefetch(iter(MixedBlockLoader(
            [c.train for c in corpora], [s.weight for s in sources], block_size, cfg.micro_batch_size, cfg.seed,
            state["data_positions"][env.rank], env.rank, env.world_size, [s.path for s in sources])))
    else:
        if "sources" in state["data_positions"][env.rank]:
            raise DataError("this run was saved training on a mix of corpora and --data now names one: resume with "
                            "the same --data list")
        loader = BlockLoader(corpora[0].train, block_size, cfg.micro_batch_size, cfg.seed,
                             DataPosition(**state["data_positions"][env.rank]), env.rank, env.world_size)
        batches = prefetch(iter(loader))
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if env.is_main else None
    writer = _tensorboard(out) if cfg.tensorboard and env.is_main else None

    def record(rec: dict) -> None:
        if metrics is None:
            return
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        if writer is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(k, v, rec["step"])

    def run_eval() -> float:
        # Every rank holds the same evaluation set; the mean over ranks only evens out numerical noise.
        block_losses = distributed.mean(evaluate(train_model, eval_set, cfg.micro_batch_size, device, amp_dtype)
                                        .to(device), env).cpu()
        loss = block_losses.mean().item()
        rec = {"step": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"],
               "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        by_source = ""
        if eval_groups:
            rec["eval_loss_by_source"] = {name: block_losses[a:b].mean().item() for name, (a, b) in eval_groups.items()}
            by_source = " (" + ", ".join(f"{n} {v:.4f}" for n, v in rec["eval_loss_by_source"].items()) + ")"
        record(rec)
        log.info("eval at step %d: loss %.4f, perplexity %.2f%s", state["step"], loss, math.exp(min(loss, 50.0)),
                 by_source)
        return loss

    def save() -> None:
        if saved["at"] == (state["step"], loader_position):
            return
        saved["at"] = (state["step"], loader_position)
        state["data_positions"] = distributed.gather_objects(loader_position, env)
        path = ckpt.save_checkpoint(out, state["step"], train_model, optimizer, state, config_yaml,
                                    cfg.keep_checkpoints, env.is_main)
        distributed.barrier(env)
        log.info("checkpoint saved: %s", path)

    loader_position = state["data_positions"][env.rank]
    # What the newest checkpoint holds (a resumed run starts from one), so that a run ending on a save step
    # does not write the same checkpoint twice.
    saved = {"at": (state["step"], loader_position) if resume_from is not None else None}
    if state["initial_eval_loss"] is None:
        state["initial_eval_loss"] = run_eval()
        if cfg.target_loss is not None:
            state["target_loss"] = (state["initial_eval_loss"] - 1.0 if cfg.target_loss == "auto"
                                    else float(cfg.target_loss))
            log.info("target loss: %.4f (%s)", state["target_loss"],
                     "initial evaluation loss - 1" if cfg.target_loss == "auto" else "given")
    elif cfg.target_loss is not None and cfg.target_loss != "auto":
        state["target_loss"] = float(cfg.target_loss)

    window = Window()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="training", unit="step", dynamic_ncols=True,
               disable=not (sys.stderr.isatty() and env.is_main))
    reason = None
    epoch_logged = -1
    session_start, session_elapsed0 = time.perf_counter(), state["elapsed_s"]
    train_model.train()
    try:
        while reason is None:
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                reason = f"max_steps {cfg.max_steps} reached"
                break
            if cfg.max_tokens is not None and state["tokens"] >= cfg.max_tokens:
                reason = f"max_tokens {cfg.max_tokens:,} reached"
                break
            if cfg.max_time is not None and distributed.any_rank(state["elapsed_s"] >= cfg.max_time, env, device):
                reason = f"max_time {cfg.max_time:.0f} s reached"
                break
            t0 = time.perf_counter()
            data_s = 0.0
            loss_sum = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum_steps):
                td = time.perf_counter()
                batch = next(batches)
                inputs, targets = batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
                data_s += time.perf_counter() - td
                with _autocast(device, amp_dtype):
                    loss = train_model(inputs, targets=targets)  # head + loss in chunks: no full logits tensor
                (loss / cfg.grad_accum_steps).backward()
                loss_sum += loss.detach()
            lr = lr_at(state["step"], cfg, decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                       else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
                grad_norm = grad_norm.full_tensor()
            # The mean over ranks: with equal batches, the loss of the global batch. One device sync, here.
            step_loss = distributed.mean(loss_sum / cfg.grad_accum_steps, env).item()
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm.item())):
                optimizer.zero_grad(set_to_none=True)
                if cfg.on_nonfinite_loss == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss ({step_loss}) or gradient norm ({grad_norm.item()}) at step "
                        f"{state['step'] + 1}; stopped. The last checkpoint is intact: lower --lr or use "
                        "--on-nonfinite-loss skip, then --resume auto")
                state["skipped_steps"] += 1
                log.warning("skipped step %d: non-finite loss or gradient", state["step"] + 1)
                loader_position = batch.position
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loader_position = batch.position
            step_time = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["elapsed_s"] = session_elapsed0 + (time.perf_counter() - session_start)
            prev = state["loss_smooth"]
            state["loss_smooth"] = step_loss if prev is None else 0.9 * prev + 0.1 * step_loss
            window.add(tokens_per_step, step_time, data_s)
            tps = tokens_per_step / step_time
            rec = {"step": state["step"], "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens": state["tokens"], "tokens_per_s": tps, "tokens_per_s_per_device": tps / env.world_size,
                   "elapsed_s": state["elapsed_s"],
                   "epoch": loader_position.get("epoch", 0), "step_time_s": step_time, "data_wait_s": data_s}
            if peak:
                rec["mfu"] = mfu(model_cfg.flops_per_token(block_size), tps, peak[1], env.world_size)
            record(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:,.0f}")
            if state["step"] % cfg.log_interval == 0:
                line_rec = {**rec, "loss_smooth": state["loss_smooth"], "tokens_per_s": window.tokens_per_s,
                            "data_wait": window.data_wait_share, "mem_gib": memory_gib(device),
                            "iter": state["step"] * cfg.grad_accum_steps - 1, "max_steps": cfg.max_steps,
                            "epoch_start": loader_position.get("epoch", 0) != epoch_logged, "peak": peak[0] if peak else None}
                epoch_logged = loader_position.get("epoch", 0)
                log.info(format_line(cfg.log_format, line_rec))
                window.reset()
            if state["step"] % cfg.eval_interval == 0:
                eval_loss = run_eval()
                target = state["target_loss"]
                if target is not None and state["target_reached"] is None and eval_loss <= target:
                    state["target_reached"] = {"step": state["step"], "tokens": state["tokens"],
                                               "elapsed_s": state["elapsed_s"], "eval_loss": eval_loss}
                    record({"step": state["step"], "event": "target_reached", "target_loss": target,
                            "eval_loss": eval_loss, "tokens": state["tokens"], "elapsed_s": state["elapsed_s"]})
                    log.info("target reached: eval loss %.4f <= %.4f at step %d, %s tokens, %.1f s", eval_loss,
                             target, state["step"], f"{state['tokens']:,}", state["elapsed_s"])
                    if not cfg.continue_after_target:
                        reason = "target loss reached"
            if state["step"] % cfg.checkpoint_interval == 0 and reason is None:
                save()
    except torch.OutOfMemoryError:
        raise ConfigError(f"out of memory at step {state['step'] + 1} with micro-batch {cfg.micro_batch_size} × "
                          f"{block_size} tokens: lower --micro-batch-size (raise --grad-accum-steps to keep the "
                          "batch) or add --activation-checkpointing") from None
    finally:
        bar.close()
        batches.close()  # stop the loader's background thread now, not at interpreter exit
        if metrics is not None and reason is None:
            metrics.close()

    log.info("stopping: %s", reason)
    final_eval = run_eval() if state["step"] % cfg.eval_interval else None
    if metrics is not None:
        metrics.close()
    save()
    weights = ckpt.full_weights(train_model)  # collective under FSDP
    if not env.is_main:
        distributed.barrier(env)  # leave together: a rank that exits early can break rank 0's last collectives
        return {"reason": reason, "steps": state["step"], "main": False}
    final_dir = save_hf(phi_from_weights(model_cfg, weights), out / "final")
    tokenizer.save(final_dir)
    summary = {"reason": reason, "model": model_cfg.name, "parameters": model_cfg.num_parameters,
               "steps": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"],
               "initial_eval_loss": state["initial_eval_loss"], "target_loss": state["target_loss"],
               "target_reached": state["target_reached"], "final_eval_loss": final_eval if final_eval is not None
               else _last_eval(out / "metrics.jsonl"), "skipped_steps": state["skipped_steps"],
               "tokens_per_s": state["tokens"] / state["elapsed_s"] if state["elapsed_s"] else 0.0,
               "final": str(final_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("wrote %s (Hugging Face format) and %s", final_dir, out / "summary.json")
    if writer is not None:
        writer.close()
    distributed.barrier(env)
    return summary


def _last_eval(path: Path) -> float | None:
    evals = [json.loads(line)["eval_loss"] for line in path.read_text().splitlines() if '"eval_loss"' in line]
    return evals[-1] if evals else None


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model from random weights",
                       description="Pretrain a Phi model from random weights. Values: defaults < --config YAML < flags.")
    p.add_argument("--config", help="YAML file of TrainConfig keys (see configs/)")
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = load(TrainConfig, args.config, overrides_from_args(args, TrainConfig))
    try:
        summary = train(cfg)
    except (DataError, NonFiniteLoss) as err:
        raise ConfigError(str(err)) from None
    if summary.get("main", True):  # under torchrun, rank 0 alone reports
        print(json.dumps(summary, indent=2))
