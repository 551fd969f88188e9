"""A run's logs: ``metrics.jsonl`` (one JSON object per step, evaluation and event), optional TensorBoard, and
the console / ``train.log`` lines in three styles (ours, the seed's, litgpt's)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

from .. import distributed
from ..config import ConfigError
from ..files import atomic_write, read_jsonl

METRICS_FILE = "metrics.jsonl"


def setup_logging(out: Path, env: distributed.DistEnv) -> list[logging.Handler]:
    """Console (above the progress bar) and OUT/train.log for every scratchlm logger (train, data, feed).

    Only rank 0 logs; other ranks report warnings alone, on stderr, marked with their rank. Returns the
    handlers added, for ``close_logging``.
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

    handlers: list[logging.Handler] = [TqdmHandler(),
                                       logging.FileHandler(out / "train.log", encoding="utf-8")]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        logging.getLogger("scratchlm").removeHandler(h)
        h.close()


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
    teacher = (f" | teacher {rec['teacher_token_share'] * 100:.1f}% of tokens"
               if rec.get("teacher_token_share") is not None else "")
    if rec.get("kd_loss") is not None:  # distilling: the loss's two parts, and how much of it had soft labels
        teacher += (f" | ce {rec['ce_loss']:.4f} kd {rec['kd_loss']:.4f} on "
                    f"{rec['soft_label_share'] * 100:.0f}% of targets")
    return (f"step {rec['step']}{total} | epoch {rec['epoch']} | loss {rec['loss']:.4f} (smoothed "
            f"{rec['loss_smooth']:.4f}) | lr {rec['lr']:.2e} | grad norm {rec['grad_norm']:.3f} | tokens "
            f"{rec['tokens']:,} | {rec['tokens_per_s']:,.0f} tok/s | {mfu_text} | data wait "
            f"{rec['data_wait'] * 100:.1f}%{teacher} | mem {rec['mem_gib']:.2f} GiB")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint a run resumes from, so no step appears twice."""
    if path.exists():
        copy_metrics(path, path, step)


def copy_metrics(source: Path, dest: Path, step: int) -> None:
    """A branched run's history: the parent's records up to the step it branched at."""
    kept = [r for r in read_jsonl(source) if r.get("step", 0) <= step] if source.exists() else []
    atomic_write(dest, "".join(json.dumps(r) + "\n" for r in kept))


def last_eval(path: Path) -> float | None:
    evals = [r["eval_loss"] for r in read_jsonl(path) if "eval_loss" in r]
    return evals[-1] if evals else None


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard and W&B, if asked); a no-op on ranks but 0."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = False, wandb: str | None = None,
                 settings: dict | None = None) -> None:
        self.file = open(out / METRICS_FILE, "a", encoding="utf-8") if enabled else None
        self.tensorboard = _tensorboard_writer(out) if enabled and tensorboard else None
        self.wandb = WandbMirror(out, wandb, settings or {}) if enabled and wandb else None

    def write(self, rec: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tensorboard.add_scalar(k, v, rec["step"])
        if self.wandb is not None:
            self.wandb.log(rec)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()


WANDB_RUN_FILE = "wandb_run_id"


class WandbMirror:
    """Every ``metrics.jsonl`` record mirrored to a Weights & Biases run, the run's settings attached.

    ``target`` is ``PROJECT`` or ``PROJECT/RUN``. The W&B run id is kept in the run folder, so a resumed run
    continues the same tracked run. Records go in as they are, each with its ``step`` field as the x-axis
    (not W&B's own step, which must only grow: a resumed run repeats the steps after its last checkpoint).
    W&B's files go where ``WANDB_DIR`` says when it is set (a cluster's scratch space, as W&B's users expect),
    else into the run folder (``OUT/wandb``; offline, ``WANDB_MODE=offline``, for a later ``wandb sync``).
    """

    def __init__(self, out: Path, target: str, settings: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install 'scratchlm[wandb]'") from None
        project, _, name = target.partition("/")
        if not project:
            raise ConfigError(f"--wandb {target!r}: give PROJECT or PROJECT/RUN")
        id_file = out / WANDB_RUN_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else secrets.token_hex(4)
        atomic_write(id_file, run_id)
        self.run = wandb.init(project=project, name=name or out.name, id=run_id, resume="allow",
                              config=settings, dir=os.environ.get("WANDB_DIR") or str(out))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, rec: dict) -> None:
        self.run.log(rec)

    def close(self) -> None:
        self.run.finish()


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))
