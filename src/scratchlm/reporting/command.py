"""``scratchlm report``: compare runs (clean against stream, distilled against plain), plot them, and say how
much more training a reference loss would take, from the loss law fitted against the runs' learning-rate
schedules (``report.law``), checked by backtests (``report.backtest``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from ..config import ConfigBase, ConfigError, NonNegative, Positive
from .forecast import forecast
from .ladder import Ladder
from .markdown import markdown
from .plots import plot_forecast, plot_runs
from .runs import PHI2_BUDGET, Run, by_data, comparisons, data_setting, kind_of, read_run


@dataclass(frozen=True)
class ReportRequest:
    """What a report is made of: the runs, where it goes, and what was measured of them outside their own
    records."""

    runs: list[Path]
    """Run folders (metrics.jsonl, summary.json, config.yaml)."""
    out: Path | None = None
    """Where report.md, report.json and the plots go (None: the report is only returned)."""
    reference: tuple[str, float] | None = None
    """A reference model's name and loss (Phi-2's)."""
    eval_losses: dict[str, float] = field(default_factory=dict)
    """Each run's final model on one text (by run name): like with like."""
    teacher_run: str | None = None
    """The run among ``runs`` that taught the others: shown beside them, compared with none."""
    teacher_seconds: dict[str, float] = field(default_factory=dict)
    """The teacher's seconds of work during each run (its cost, apart from the student's)."""
    seed_spread: tuple[float, str] | None = None
    """How far two seeds of a control run land apart, and where that was measured."""
    predict_tokens: float | None = None
    predict_model: str | None = None
    predict_schedule: str | None = None
    momentum: float | None = None
    ladder: Path | None = None
    """A ladder's ladder.json (or the report.json holding it): its floor for each size bounds the answers
    for runs of fewer sizes."""


def build_report(request: ReportRequest) -> dict:
    """The report of ``request``: written to ``request.out`` when given (report.md, report.json and the PNG
    plots with their data as JSON), and returned."""
    runs = [read_run(Path(d)) for d in request.runs]
    known = Ladder.read(request.ladder) if request.ladder else None
    reference = request.reference
    outlooks = {}
    for data, group in by_data(runs, request.teacher_run).items():
        try:
            outlooks[data] = forecast(group, request.predict_tokens, request.predict_model,
                                      reference[1] if reference else None, request.momentum,
                                      request.predict_schedule, known)
        except ValueError as err:
            outlooks[data] = {"error": str(err)}
    if request.out is None:
        return {"forecasts": outlooks}
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, reference, out)
    rows = [_row(run, request, reference) for run in runs]
    # One full answer, for the first group of runs (the corpus runs, in the demo): its plot draws it.
    first = next(iter(outlooks), None)
    if first is not None and "error" not in outlooks[first]:
        outlooks[first]["plot"] = "forecast.png"
        plot_forecast(by_data(runs, request.teacher_run)[first], outlooks[first], reference,
                      out / "forecast.png")
        if "ladder" in outlooks[first]:
            (out / "ladder.json").write_text(json.dumps(outlooks[first]["ladder"], indent=2))
    report = {"runs": rows, "reference": {"name": reference[0], "loss": reference[1]} if reference else None,
              "comparisons": comparisons(runs, rows, request.teacher_seconds, request.seed_spread),
              "forecasts": outlooks, "phi2_budget": PHI2_BUDGET}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def _row(run: Run, request: ReportRequest, reference: tuple[str, float] | None) -> dict:
    """A run's line of the table (a run stopped without its summary, killed or preempted: what its
    evaluations say)."""
    s = run.summary
    row = {"run": run.name, "initial_loss": run.initial_eval_loss, "target_loss": s.get("target_loss"),
           "target_reached": s.get("target_reached"), "final_eval_loss": run.final_eval_loss,
           "steps": s.get("steps"), "tokens": s.get("tokens"), "tokens_per_s": s.get("tokens_per_s"),
           "wall_s": s.get("elapsed_s"), "teacher_token_share": run.teacher_token_share,
           "data": data_setting(run), "kind": kind_of(run, request.teacher_run)}
    if run.name in request.eval_losses:
        row["final_loss_on_eval_data"] = request.eval_losses[run.name]
    if reference:
        compare = row.get("final_loss_on_eval_data", run.final_eval_loss)
        row["gap_to_reference"] = compare - reference[1] if compare is not None else None
    return row


class ReportConfig(ConfigBase):
    """Plots, tables and "how much more training" for one or more runs, against a reference."""

    positional: ClassVar[tuple[str, ...]] = ("runs",)
    runs: list[str]
    """Run folders (with metrics.jsonl and summary.json)."""
    out: str | None = None
    """Folder for report.md, report.json and the plots (optional with --json)."""
    predict_tokens: Positive | None = None
    """Predict the final evaluation loss of a run of this many tokens (the longest run's schedule)."""
    predict_model: str | None = None
    """... of this model preset (needs runs of two sizes or more; e.g. phi-2)."""
    predict_schedule: Literal["cosine", "wsd", "constant"] | None = None
    """... with this learning-rate schedule instead of the longest run's (same peak, warmup, minimum)."""
    annealing_momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    """λ of the loss law's annealing area (default: fitted when two runs or more decay, else 0.95)."""
    as_json: bool = Field(False, alias="json")
    """Print the forecast as JSON: predicted_loss, interval, backtest_error and the fitted parameters."""
    reference_loss: NonNegative | None = None
    """Reference loss in nats/token (Phi-2 on WikiText-2: 2.273)."""
    reference_name: str | None = None
    """Label of the reference."""
    reference_model: str | None = None
    """Measure the reference instead: a model folder or hub id (e.g. microsoft/phi-2); needs --eval-data."""
    eval_data: str | None = None
    """Text on which every run's final model (and the --reference-model) is evaluated: like with like."""
    block_size: Annotated[int, Field(ge=2)] = 2048
    """Window length of the --reference-model evaluation."""
    max_eval_tokens: Annotated[int, Field(ge=2)] | None = None
    """Cap on evaluated tokens."""
    ladder: str | None = None
    """A model-size ladder's ladder.json (written by a report over runs of three sizes or more, e.g.
    bench/ladder.py's): the floor it measures for each size bounds the answers for these runs."""
    teacher_run: str | None = None
    """The name of a run among RUNS that taught the others (its held-out loss shown beside theirs, compared
    with none)."""


def _measured(cfg: ReportConfig) -> tuple[tuple[str, float] | None, dict[str, float]]:
    """Every run's final model's loss on --eval-data (one text for all: like with like) and, with
    --reference-model, the reference model's on the same text."""
    from ..devices import pick_device
    from ..evaluation import evaluate_model, whole_documents
    from ..tokenizer import load_tokenizer

    if not cfg.eval_data:
        raise ConfigError("--reference-model needs --eval-data: the text both are measured on")
    device, tokenizer, texts = pick_device(), load_tokenizer(), whole_documents(cfg.eval_data)

    def loss_of(model: str) -> float:
        return evaluate_model(model, texts, tokenizer, cfg.block_size, device,
                              max_tokens=cfg.max_eval_tokens).loss

    reference = ((cfg.reference_name or cfg.reference_model, loss_of(cfg.reference_model))
                 if cfg.reference_model else None)
    return reference, {Path(d).name: loss_of(str(Path(d) / "final")) for d in cfg.runs}


def report_config(cfg: ReportConfig) -> dict:
    """What ``scratchlm report`` makes (the Python API's ``report``): the report, written to --out if
    given."""
    reference, extra = None, None
    if cfg.reference_model or cfg.eval_data:
        reference, extra = _measured(cfg)
    if reference is None and cfg.reference_loss is not None:
        reference = (cfg.reference_name or "reference", cfg.reference_loss)
    if cfg.out is None and not cfg.as_json:
        raise ConfigError("give --out (a folder for the report) or --json (the forecast on standard output)")
    return build_report(ReportRequest(
        runs=[Path(d) for d in cfg.runs], out=Path(cfg.out) if cfg.out else None, reference=reference,
        eval_losses=extra or {}, teacher_run=cfg.teacher_run, predict_tokens=cfg.predict_tokens,
        predict_model=cfg.predict_model, predict_schedule=cfg.predict_schedule,
        momentum=cfg.annealing_momentum, ladder=Path(cfg.ladder) if cfg.ladder else None))


def run_report(cfg: ReportConfig) -> None:
    report = report_config(cfg)
    if cfg.as_json:
        # the runs that trained on what the first run given trained on
        outlook = next(iter(report["forecasts"].values()))
        if "error" in outlook:
            raise ConfigError(f"no forecast: {outlook['error']}")
        print(json.dumps(outlook, indent=2))
    else:
        print(f"wrote {Path(cfg.out) / 'report.md'} ({len(report['runs'])} runs)")
