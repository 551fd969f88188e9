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
    from ..training.config import TrainConfig

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


def by_data(runs: list[Run], teacher_run: str | None = None) -> dict[str, list[Run]]:
    """Runs grouped by what they trained on and how (a corpus by its path; through a feed, by ``KINDS``): one
    loss law per group, since a curve on other text, or with a teacher's distribution, is another curve. The
    teacher is in none."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        kind = kind_of(run, teacher_run)
        if kind == "teacher":
            continue
        data = (run.config.data if run.config else None) or "unknown data"
        key = {"corpus": data, "corpus+knowledge": f"{data}, distilling"}.get(kind, KINDS[kind])
        groups.setdefault(key, []).append(run)
    return groups


KINDS = {"corpus": "the corpus, read directly",
         "feed": "the corpus through the feed, no teacher",
         "stream": "the feed with the teacher's text, cross-entropy",
         "knowledge": "the corpus through the feed, distilling from the teacher at every token",
         "stream+knowledge": "the feed with the teacher's text, distilling",
         "corpus+knowledge": "the corpus with prepared soft labels, distilling",
         "teacher": "the teacher"}
"""What a run trained on and how (``kind_of``)."""
CONTROLS = {"feed": ("corpus",), "stream": ("feed", "corpus"), "knowledge": ("feed", "corpus"),
            "stream+knowledge": ("feed", "corpus"), "corpus+knowledge": ("corpus",)}
"""What a run of each kind is measured against, in order of preference: the run that differs from it in one
thing only (the feed's path is fair to the corpus's, bench/stream_fairness.py, so a corpus run stands in for a
feed run where there is none)."""
ANSWERS = {
    "path": ("feed", "corpus", "**The path** (the feed against the corpus, no teacher in either): what the "
                               "feed's loader changes, and nothing else"),
    "text": ("stream", "feed", "**The teacher's text** (the stream, a share of its tokens written by the "
                               "teacher, plain cross-entropy, against the feed): what learning from what it "
                               "writes changes"),
    "knowledge": ("knowledge", "feed", "**The teacher's knowledge** (the same corpus through the feed, "
                                       "learning the teacher's distribution at every token, against the "
                                       "feed): what its distribution is worth"),
    "text+knowledge": ("stream+knowledge", "feed", "**The teacher's text and knowledge together** (the "
                                                   "stream, distilling, against the feed)"),
    "prepared": ("corpus+knowledge", "corpus", "**Prepared soft labels** (distilling from a teacher's scores "
                                               "made beforehand, against the corpus run)"),
    "total": ("stream", "corpus", "**Clean against stream** as the seed compared them: the path and the "
                                  "teacher's text together")}
"""The questions the runs answer: (the kind that answers, its control, what it says)."""


def kind_of(run: Run, teacher_run: str | None = None) -> str:
    """What a run trained on and how: a key of ``KINDS`` (``teacher_run``: the run that taught the others)."""
    if run.name == teacher_run:
        return "teacher"
    data = data_setting(run)
    if (run.distill_weight or 0) > 0:
        return "knowledge" if data == "feed" else f"{data}+knowledge"
    return data


def _loss(row: dict) -> float | None:
    """A run's final loss on the shared evaluation text where it was measured, else its own evaluation."""
    return row.get("final_loss_on_eval_data", row["final_eval_loss"])


def comparisons(runs: list[Run], rows: list[dict], teacher_seconds: dict[str, float] | None = None,
                seed_spread: tuple[float, str] | None = None) -> dict | None:
    """Each run against its control (``CONTROLS``): its final loss, and the tokens and wall time it took to
    reach the control's final loss (from the runs' own evaluations, the same held-out blocks for all), with
    the teacher's own seconds apart; and the answers (``ANSWERS``): the mean final loss of one kind less its
    control's. ``seed_spread``: how far two seeds of a control land apart, and where that was measured (else
    the spread of the runs' own seeds, where a kind has several). None without two kinds to compare."""
    by_name = {run.name: run for run in runs}
    kinds = {row["run"]: row["kind"] for row in rows}
    first = {}
    for row in rows:
        first.setdefault(row["kind"], row["run"])
    table = {}
    for row in rows:
        control = next((first[k] for k in CONTROLS.get(row["kind"], ()) if k in first), None)
        entry = {"kind": row["kind"], "loss": _loss(row), "control": control,
                 "teacher_seconds": (teacher_seconds or {}).get(row["run"])}
        if control is not None and by_name[control].evals and by_name[row["run"]].evals:
            target = by_name[control].evals[-1].eval_loss
            tokens, seconds = reach(by_name[row["run"]].evals, target)
            base_tokens, base_seconds = reach(by_name[control].evals, target)
            entry.update(target=target, tokens=tokens, seconds=seconds,
                         token_ratio=tokens / base_tokens if tokens and base_tokens else None,
                         time_ratio=seconds / base_seconds if seconds and base_seconds else None)
        table[row["run"]] = entry
    losses: dict[str, list[float]] = {}
    for row in rows:
        if _loss(row) is not None and row["kind"] != "teacher":
            losses.setdefault(row["kind"], []).append(_loss(row))
    mean = {kind: float(np.mean(v)) for kind, v in losses.items()}
    # An answer is measured against its own control, else the stand-in CONTROLS names for that kind.
    against = {name: next((k for k in (b, *CONTROLS.get(a, ())) if k in mean), None)
               for name, (a, b, _) in ANSWERS.items() if a in mean}
    against = {name: k for name, k in against.items() if k is not None}
    answers = {name: mean[ANSWERS[name][0]] - mean[k] for name, k in against.items()}
    if not answers:
        return None
    own = {kind: max(v) - min(v) for kind, v in losses.items() if len(v) > 1}
    spread = (seed_spread if seed_spread else (max(own.values()), "the runs' own seeds") if own else None)
    return {"runs": table, "answers": answers, "answered_against": against, "means": mean, "kinds": kinds,
            "spread": {"nats": spread[0], "from": spread[1]} if spread else None,
            "same_text": all("final_loss_on_eval_data" in r for r in rows)}


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
    ce_loss: float | None = None
    """A distilled step's cross-entropy on the real next token (its ``loss`` mixes in the KL)."""

    @property
    def next_token_loss(self) -> float:
        """The step's cross-entropy: what a plain run's ``loss`` is, so runs of both kinds compare."""
        return self.loss if self.ce_loss is None else self.ce_loss


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
    from ..training.config import TrainConfig

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
