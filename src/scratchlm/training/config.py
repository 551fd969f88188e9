"""``TrainConfig``: every setting of a training run, each field's docstring its ``--help``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from ..config import (
    ConfigError,
    Count,
    DistillTemperature,
    NonNegative,
    NonNegativeInt,
    Positive,
    Share,
)
from ..data.reading import CorpusReading, FeedReading, SoftLabelReading
from ..model.config import ModelConfig, get_preset

if TYPE_CHECKING:  # the config stays light to import: the CLI reads it before anything runs
    import torch

    from ..data.pipeline import DataRequest


class TrainConfig(CorpusReading, FeedReading, SoftLabelReading):
    """Everything a training run needs; saved as ``config.yaml`` in the run folder and in every checkpoint."""

    model: str = "phi-tiny"
    """Model preset (see `scratchlm model-info --list`)."""
    data: str | None = None
    """Training text: a folder, .zip, .txt, .jsonl(.gz/.zst), .parquet, a Hugging Face dataset
    hf:NAME[:CONFIG][@SPLIT], or a feed URL http(s)://host:port (default: $SCRATCHLM_DATA). A mix:
    PATH:WEIGHT,PATH:WEIGHT (relative weights: shares of training blocks; evaluation losses are also logged
    per source)."""
    feed_url: str | None = None
    """The seed's setting: a feed server URL to train from (same as --data http://...)."""
    out: str = "runs/train"
    """Run folder: logs, metrics.jsonl, checkpoints/, final/."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: $SCRATCHLM_TOKENIZER, else microsoft/phi-2)."""
    max_steps: Count | None = None
    """Stop after this many optimizer steps."""
    max_tokens: Count | None = None
    """Stop after this many training tokens."""
    max_time: Positive | None = None
    """Stop after this many seconds of training (summed over resumed sessions)."""
    target_loss: Literal["auto"] | NonNegative | None = None
    """Stop when the evaluation loss reaches this; 'auto' = the initial evaluation loss minus 1."""
    continue_after_target: bool = False
    """Log the target when reached but keep training until another stop rule."""
    resume: str | None = None
    """'auto' = continue from the newest complete checkpoint in the run folder (if any); or a checkpoint
    path."""
    resume_from: str | None = None
    """Branch a new run (in --out) off another run's checkpoint: its weights, optimizer, data position and
    metrics so far. With --decay-steps N the rate decays from the checkpoint's over N steps and the run stops
    there: the loss a run of that length would have ended at, for N more steps of compute."""
    micro_batch_size: Count = 8
    """Sequences per forward/backward pass."""
    grad_accum_steps: Count = 1
    """Micro-batches per optimizer step (global batch = micro_batch_size × grad_accum_steps × ranks)."""
    block_size: Count | None = None
    """Tokens per training sequence (default: the model's context; a longer one widens the model's context, as
    a rotary model learns no positions)."""
    lr: Positive = 6e-4
    """Peak learning rate, reached after warmup."""
    min_lr: NonNegative = 6e-5
    """Learning rate at the end of the decay."""
    warmup_steps: NonNegativeInt = 100
    """Linear warmup steps from 0 to lr."""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: 'cosine' down to min_lr at the end of the run; 'wsd' (warmup-stable-decay) constant,
    then a final decay (1 − √progress) over the last --decay-fraction of the run; 'constant'. To ask "how
    much more training", use wsd: its runs of any length share one curve until their decays, a decay can be
    branched off any checkpoint (--resume-from), and `report` fits the loss against the schedule."""
    decay_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """wsd: the share of the run spent in the final decay."""
    decay_steps: Count | None = None
    """wsd: steps of the final decay (instead of --decay-fraction); with --resume-from: decay over this many
    steps from the checkpoint, then stop."""
    lr_decay_steps: Count | None = None
    """The step at which the decay ends (default: max_steps, else max_tokens / tokens per step; with
    neither, the rate stays at lr after warmup)."""
    weight_decay: NonNegative = 0.1
    """AdamW weight decay, applied to matrices and embeddings only (not biases, not LayerNorm)."""
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """AdamW beta1."""
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    """AdamW beta2."""
    grad_clip: NonNegative = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 1337
    """Seed for weight init and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; 'auto' = cuda if available."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """'bf16' = bf16 autocast with fp32 weights; 'fp16' = float16 autocast with dynamic loss scaling (GPUs
    without bf16: T4, P100, V100); 'auto' = bf16 on a GPU that has it, else fp16 on a GPU, fp32 on a CPU."""
    loss_scale: Positive = 65536.0
    """fp16: the initial dynamic loss scale (halved at each overflow, the step skipped; doubled after 2,000
    steps without one)."""
    compile: bool = False
    """torch.compile each block."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    """Data parallelism under torchrun: DDP (replicas) or FSDP2 (sharded); 'auto' = single for one process,
    FSDP from 1B parameters, else DDP."""
    fsdp_reduce_fp32: bool = True
    """With FSDP and bf16: reduce gradients in fp32 (more exact, twice the traffic) rather than bf16."""
    eval_interval: Count = 50
    """Evaluate on the held-out set every this many steps (also before step 1 and at the end)."""
    eval_batches: Count = 8
    """Micro-batches in each evaluation (always the same held-out blocks)."""
    num_proc: Count | None = None
    """Processes that tokenize a corpus the first time it is used (default: every core)."""
    distill_weight: Share = 0.0
    """Distillation: loss = (1 − A)·cross-entropy + A·T²·KL(teacher ‖ student) at every position with the
    teacher's top-k (--soft-labels K), plain cross-entropy elsewhere; A = this (0: off). The top-k is made a
    whole distribution with one "every other token" bucket (README, "Distillation")."""
    distill_temperature: DistillTemperature = 1.0
    """T of the distillation loss (1, as Busbridge et al. 2025 recommend)."""
    verify_cache: bool = False
    """Read every token shard of the corpus's cache and check it against the checksum written with it (sizes
    are checked at every start); a damaged shard is tokenized again, with a warning naming it."""
    log_interval: Count = 1
    """Write a console/train.log line every this many steps (metrics.jsonl gets every step)."""
    log_format: Literal["default", "seed", "litgpt"] = "default"
    """Console line style: ours, the seed's 'Epoch: … Step count: … loss = …', or litgpt's 'iter … step …'."""
    checkpoint_interval: Count = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: Count = 2
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop with a message (the last checkpoint stays intact) or skip the
    step."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run folder (needs the tensorboard package)."""
    wandb: str | None = None
    """Mirror every metrics.jsonl record to Weights & Biases: PROJECT or PROJECT/RUN (needs the wandb extra;
    WANDB_MODE=offline writes OUT/wandb for a later ``wandb sync``). A resumed run continues the same W&B
    run."""

    def check(self) -> None:
        """Settings that are each valid but make no run together: no stop rule, conflicting resumes."""
        branch_decay = self.decay_steps if self.resume_from is not None else None
        if not any(x is not None for x in (self.max_steps, self.max_tokens, self.max_time, self.target_loss,
                                           branch_decay)):
            raise ConfigError("no stop rule: give --max-steps, --max-tokens, --max-time or --target-loss")
        if self.distill_weight > 0 and not self.soft_labels:
            raise ConfigError("--distill-weight learns from the teacher's top-k: give --soft-labels K (a "
                              "feed started with --soft-labels, or a corpus prepared with prepare "
                              "--soft-labels)")
        if self.resume_from is not None and self.resume not in (None, "auto"):
            raise ConfigError("--resume-from starts a new run off another run's checkpoint; --resume "
                              "continues this one: give one of them (--resume auto continues a branch)")
        if self.decay_steps is not None and self.resume_from is None and self.lr_schedule != "wsd":
            raise ConfigError("--decay-steps is the length of a wsd run's final decay, or of a decay "
                              "branched off a checkpoint with --resume-from; this run's schedule is "
                              f"{self.lr_schedule}")

    def preset(self) -> ModelConfig:
        """The model preset, its context widened to this run's block where the run asks for a longer one: a
        rotary model learns no positions, so its context is only the length of its rotary table."""
        model = get_preset(self.model)
        if self.block_size is not None and self.block_size > model.block_size:
            return model.model_copy(update={"block_size": self.block_size})
        return model

    def resolved_block_size(self) -> int:
        """``block_size``, or the model's context when unset."""
        return self.block_size or self.preset().block_size

    def data_request(self, progress: bool = False, run_batches: int | None = None) -> DataRequest:
        """What this run asks of the data (``build_data``); the data setting falls back to $SCRATCHLM_DATA.
        ``run_batches``: the micro-batches each rank draws over the run as planned, when known."""
        from ..data import corpus_from_env
        from ..data.pipeline import DataRequest

        source = self.feed_url or corpus_from_env(self.data, "--data")
        return DataRequest(source=source, block_size=self.resolved_block_size(),
                           batch_size=self.micro_batch_size,
                           eval_blocks=self.eval_batches * self.micro_batch_size, seed=self.seed,
                           verify_cache=self.verify_cache, reading=self.part(CorpusReading),
                           feed=self.part(FeedReading), soft=self.part(SoftLabelReading),
                           num_proc=self.num_proc, run_batches=run_batches, progress=progress)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 or fp16 when asked; on 'auto', bf16 on a GPU that has it, else fp16 on a GPU; None = fp32."""
        import torch

        if self.precision == "auto" and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


# Settings that only say when to stop or how to log may change on resume; the rest would change the run.
RESUMABLE_CHANGES = {"max_steps", "max_tokens", "max_time", "target_loss", "continue_after_target", "resume",
                     "resume_from",
                     "log_interval", "log_format", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                     "tensorboard", "wandb", "compile", "activation_checkpointing", "device", "out", "data",
                     "num_proc", "verify_cache",
                     "tokenizer"}
