"""Reading runs for the report: a run folder's config, summary and records (``metrics.jsonl``), its label and
data setting, when it reached a loss, and the measures across runs (clean against stream, distillation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..files import read_jsonl
from .law import Curve

if TYPE_CHECKING:
    from ..model.config import ModelConfig
    from ..train.config import TrainConfig

ParameterCount = Literal["total", "non_embedding"]
"""How a model's size N is counted: every parameter (Chinchilla), or without the vocabulary's matrices
(Kaplan et al. 2020)."""

PHI2_BUDGET = {"tokens": 1.4e12, "gpus": 96, "gpu": "A100-80G", "days": 14, "gpu_hours": 96 * 14 * 24}
PHI2_WIKITEXT_LOSS = 2.273  # nats/token: perplexity 9.705 on WikiText-2, 2048-token windows (AutoAWQ PR #496)


TEACHER_FREE = 0.005
"""A feed run whose teacher wrote less than this share of its tokens counts as one without a teacher."""


def data_setting(run: Run) -> str:
    """What a run trained on: 'corpus' (one corpus or a mix, read directly), 'feed' (a feed with no teacher
    text: the feed's path alone) or 'stream' (a feed with teacher text)."""
    data = (run.config.feed_url or run.config.data) if run.config else None
    if not (data and data.startswith(("http://", "https://"))):
        return "corpus"
    return "stream" if (run.teacher_token_share or 0.0) >= TEACHER_FREE else "feed"


def by_data(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by what they trained on (every feed without teacher text counts as one, every feed with
    it as another): one loss law per group, since a curve on other text is another curve."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        kind = data_setting(run)
        key = {"feed": "a feed, no teacher text", "stream": "a feed with teacher text"}.get(
            kind, (run.config.data if run.config else None) or "unknown data")
        groups.setdefault(key, []).append(run)
    return groups


def effects(rows: list[dict]) -> dict | None:
    """Clean against stream, like with like: what the feed's path alone changes (a feed run with no teacher
    against a corpus run) and what the teacher changes (a stream run against the feed run with no teacher),
    on the same held-out text where the runs were evaluated on one (else their own evaluations). None without
    at least two of the three kinds."""
    def loss(row: dict) -> float | None:
        return row.get("final_loss_on_eval_data", row["final_eval_loss"])

    by_kind: dict[str, list[float]] = {}
    for row in rows:
        if loss(row) is not None:
            by_kind.setdefault(row["data"], []).append(loss(row))
    mean = {kind: float(np.mean(values)) for kind, values in by_kind.items()}
    pairs = {"path": ("feed", "corpus"), "teacher": ("stream", "feed"), "total": ("stream", "corpus")}
    out = {name: mean[a] - mean[b] for name, (a, b) in pairs.items() if a in mean and b in mean}
    if not out:
        return None
    return {**out, "means": mean, "same_text": all("final_loss_on_eval_data" in r for r in rows)}


# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRecord:
    """One training step's line of ``metrics.jsonl`` (the fields the report reads)."""

    step: int
    tokens: int
    loss: float
    elapsed_s: float | None = None
    lr: float | None = None
    teacher_token_share: float | None = None


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation's line of ``metrics.jsonl``."""

    step: int
    tokens: int
    eval_loss: float
    elapsed_s: float | None = None
    eval_loss_by_source: dict[str, float] = field(default_factory=dict)


def _record(kind: type, raw: dict):
    return kind(**{f.name: raw[f.name] for f in fields(kind) if raw.get(f.name) is not None})


@dataclass
class Run:
    """A run folder as the report reads it: its config, its summary (``summary.json``, empty while the run
    has none: killed, preempted) and the records of its ``metrics.jsonl``."""

    name: str
    dir: Path
    config: TrainConfig | None
    summary: dict
    train: list[TrainRecord]
    evals: list[EvalRecord]

    @property
    def model(self) -> ModelConfig | None:
        return self.config.preset() if self.config else None

    @property
    def parameters(self) -> int | None:
        """All parameters (the count Chinchilla fits)."""
        return self.summary.get("parameters") or (self.model.num_parameters if self.model else None)

    def count(self, kind: ParameterCount) -> int | None:
        """The model's size counted one way: 'total', or 'non_embedding' (Kaplan's: no vocabulary
        matrices)."""
        if kind == "total" or self.model is None:
            return self.parameters
        return self.model.num_non_embedding_parameters

    @property
    def teacher_token_share(self) -> float | None:
        """What a stream run really trained on (every step has the same number of tokens: a plain mean)."""
        shares = [r.teacher_token_share for r in self.train if r.teacher_token_share is not None]
        return sum(shares) / len(shares) if shares else None

    @property
    def distill_weight(self) -> float | None:
        return self.config.distill_weight if self.config else None

    @property
    def initial_eval_loss(self) -> float | None:
        return self.summary.get("initial_eval_loss", self.evals[0].eval_loss if self.evals else None)

    @property
    def final_eval_loss(self) -> float | None:
        return self.summary.get("final_eval_loss", self.evals[-1].eval_loss if self.evals else None)

    @property
    def label(self) -> str:
        """The run's name, with the share of its tokens a teacher wrote when it trained from a feed."""
        share = self.teacher_token_share
        return self.name if share is None else f"{self.name} (teacher {share:.1%} of tokens)"

    def curve(self, count: ParameterCount = "total") -> Curve:
        """What a fit sees of the run, its size counted ``count``'s way (a step skipped for a non-finite loss
        keeps the rate of the step before)."""
        last = self.evals[-1].step if self.evals else 0
        logged = {r.step: r.lr for r in self.train if r.lr is not None}
        rates, rate = np.zeros(last), next(iter(logged.values()), 0.0)
        for s in range(1, last + 1):
            rate = logged.get(s, rate)
            rates[s - 1] = rate
        points = [r for r in self.evals if r.step > 0]
        return Curve(self.name, np.array([r.step for r in points]),
                     np.array([r.tokens for r in points], float), np.array([r.eval_loss for r in points]),
                     rates, self.count(count))


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    return Run(run_dir.name, run_dir, _run_config(run_dir),
               json.loads(summary_path.read_text()) if summary_path.exists() else {},
               [_record(TrainRecord, r) for r in records if "loss" in r],
               [_record(EvalRecord, r) for r in records if "eval_loss" in r])


def _run_config(run_dir: Path) -> TrainConfig | None:
    """The run's TrainConfig (its config.yaml), or None for a folder without one."""
    from ..config import read_yaml
    from ..train.config import TrainConfig

    path = run_dir / "config.yaml"
    return TrainConfig.model_validate(read_yaml(path)) if path.exists() else None


def reach(evals: list[EvalRecord], target: float) -> tuple[float | None, float | None]:
    """Tokens and wall seconds at which a run's evaluations first reach ``target`` (interpolated between
    evaluations, in log tokens), or None."""
    evals = [r for r in evals if r.tokens > 0]
    if evals and evals[0].eval_loss <= target:
        return float(evals[0].tokens), evals[0].elapsed_s
    for before, after in zip(evals, evals[1:], strict=False):
        if after.eval_loss <= target < before.eval_loss:
            f = (before.eval_loss - target) / (before.eval_loss - after.eval_loss)
            log_tokens = np.log(before.tokens) + f * (np.log(after.tokens) - np.log(before.tokens))
            seconds = (before.elapsed_s + f * (after.elapsed_s - before.elapsed_s)
                       if before.elapsed_s is not None and after.elapsed_s is not None else None)
            return float(np.exp(log_tokens)), seconds
    return None, None


def distillation(runs: list[Run]) -> dict | None:
    """What a teacher's distribution bought: the tokens and wall time each run took to reach the final
    held-out loss of the first run that does not distil (from the runs' own evaluations), against that run's
    own. None unless some run distils."""
    distils = [r for r in runs if (r.distill_weight or 0) > 0]
    plain = next((r for r in runs if r.distill_weight == 0 and r.evals), None)
    if not distils or plain is None:
        return None
    target = plain.evals[-1].eval_loss
    base_tokens, base_s = reach(plain.evals, target)
    rows = {}
    for run in runs:
        tokens, seconds = reach(run.evals, target)
        rows[run.name] = {"distill_weight": run.distill_weight,
                          "tokens": tokens, "token_ratio": tokens / base_tokens if tokens else None,
                          "seconds": seconds,
                          "time_ratio": seconds / base_s if seconds and base_s else None}
    return {"plain_run": plain.name, "target": target, "runs": rows}
