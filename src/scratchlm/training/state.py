"""What a training run has done so far: saved as ``state.json`` in every checkpoint and restored on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Training tokens consumed (all ranks)."""
    elapsed_s: float = 0.0
    """Seconds of training, summed over resumed sessions."""
    data_positions: list[dict] = field(default_factory=lambda: [{}])
    """Each rank's data stream position after the last batch it trained on (or skipped)."""
    initial_eval_loss: float | None = None
    """The held-out loss before the first step."""
    target_loss: float | None = None
    """The evaluation loss that ends the run (``--target-loss``), once known."""
    target_reached: dict | None = None
    """Step, tokens, time and loss of the evaluation that first reached the target."""
    loss_smooth: float | None = None
    """Exponential moving average of the training loss (for the console)."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient (``--on-nonfinite-loss skip``)."""
    branch: dict | None = None
    """A run branched off another (``--resume-from``): the checkpoint, its step, the parent's rate there."""
    overflow_steps: int = 0
    """fp16: steps whose gradients overflowed, skipped by the loss scaler (which then lowered the scale)."""
    loss_scaler: dict | None = None
    """fp16: the dynamic loss scaler's state (scale, growth tracker), so that a resumed run scales alike."""

    @classmethod
    def start(cls, world_size: int) -> TrainState:
        return cls(data_positions=[{} for _ in range(world_size)])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """The state a checkpoint holds; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def record_target(self, eval_loss: float) -> bool:
        """Note an evaluation; True when it reaches the target for the first time."""
        if self.target_loss is None or self.target_reached is not None or eval_loss > self.target_loss:
            return False
        self.target_reached = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s,
                               "eval_loss": eval_loss}
        return True
