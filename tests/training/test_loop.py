"""``fit``, the training loop, on its own: a tiny model, token blocks in memory, no tokenizer, corpus or
command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scratchlm.data.loaders import BlockLoader, eval_blocks
from scratchlm.data.pipeline import TrainData
from scratchlm.distributed import DistEnv
from scratchlm.model.config import ModelConfig
from scratchlm.model.loss import LossTerms
from scratchlm.model.model import Phi
from scratchlm.training import NonFiniteLoss, TrainConfig, fit
from scratchlm.training import checkpoint as ckpt
from scratchlm.training.logs import MetricsLog
from scratchlm.training.loop import Checkpointer, Run
from scratchlm.training.optim import build_optimizer, schedule_for
from scratchlm.training.state import TrainState

TINY = ModelConfig(name="loop", vocab_size=500, padded_vocab_size=512, n_layer=2, n_embd=32, n_head=2,
                   intermediate_size=64, rotary_pct=0.5, block_size=32)


def make_run(out, model: torch.nn.Module | None = None, **settings) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(**{"micro_batch_size": 2, "block_size": 16, "warmup_steps": 2, "lr": 1e-3,
                         "eval_batches": 1,
                         "log_interval": 1, "device": "cpu", **settings})
    torch.manual_seed(0)
    model = model or Phi(TINY)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, 17 * 40).astype(np.uint16)
    data = TrainData("corpus", iter(BlockLoader(tokens, 16, 2, seed=1)), eval_blocks(tokens, 16, 2))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    state = TrainState.start(1)
    return Run(cfg=cfg, model=model, optimizer=optimizer, data=data, state=state,
               metrics=MetricsLog(out, True),
               checkpoints=Checkpointer(out, model, optimizer, "{}", keep=10, env=DistEnv()),
               device=torch.device("cpu"), tokens_per_step=2 * 16, schedule=schedule_for(cfg, cfg.max_steps))


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_fit_steps_evaluates_and_checkpoints_on_schedule(tmp_path):
    run = make_run(tmp_path, max_steps=6, eval_interval=2, checkpoint_interval=3)
    reason = fit(run)
    run.metrics.close()
    assert reason == "max_steps 6 reached"
    assert run.state.step == 6 and run.state.tokens == 6 * 32
    recs = records(tmp_path)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "eval_loss" in r] == [0, 2, 4, 6]
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000006"]
    saved = json.loads((tmp_path / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert saved["step"] == 6 and saved["data_positions"] == [{"kind": "corpus", "epoch": 0, "index": 12}]
    assert abs(recs[0]["eval_loss"] - math.log(TINY.padded_vocab_size)) < 0.5
    run.checkpoints.save(run.state)  # already saved at this step: not written again
    assert len(ckpt.checkpoint_dirs(tmp_path)) == 2


def test_fit_stops_at_the_target_loss_and_at_max_tokens(tmp_path):
    run = make_run(tmp_path / "target", max_steps=50, eval_interval=3, target_loss=100.0)
    assert fit(run) == "target loss reached"
    assert run.state.step == 3 and run.state.target_reached["step"] == 3
    run.metrics.close()
    assert any(r.get("event") == "target_reached" for r in records(tmp_path / "target"))

    tokens = make_run(tmp_path, max_tokens=5 * 32, eval_interval=100)
    assert fit(tokens) == f"max_tokens {5 * 32:,} reached" and tokens.state.step == 5


class NaNOnSecondCall(torch.nn.Module):
    """The tiny model, but its second training forward returns NaN (an overflow, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = Phi(TINY), 0

    def forward(self, idx, targets=None, **soft_labels):
        out = self.inner(idx, targets=targets, **soft_labels)
        if targets is not None and self.training:  # evaluation also passes targets, in eval mode
            self.calls += 1
            if self.calls == 2:
                return LossTerms(out.loss * float("nan"), out.ce, out.kd)
        return out


def test_fit_skips_or_stops_on_a_non_finite_loss(tmp_path):
    run = make_run(tmp_path, model=NaNOnSecondCall(), max_steps=4, eval_interval=100,
                   on_nonfinite_loss="skip")
    assert fit(run) == "max_steps 4 reached"
    assert run.state.step == 4 and run.state.skipped_steps == 1
    assert run.state.data_positions[0]["index"] == 5 * 2  # the skipped batch is consumed, not replayed
    assert all(torch.isfinite(p).all() for p in run.model.parameters())

    stopped = make_run(tmp_path / "stop", model=NaNOnSecondCall(), max_steps=4, eval_interval=100)
    with pytest.raises(NonFiniteLoss, match="at step 2"):
        fit(stopped)
    assert stopped.state.step == 1
