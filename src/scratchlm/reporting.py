"""``scratchlm report``: compare runs (clean vs stream), plot them, and say how much more training it would
take.

For each run: the loss curves (training and evaluation, against steps and against tokens, all runs on one
figure), a table (initial loss, when initial − 1 was reached, final loss, throughput, wall time), the gap to a
reference (Phi-2), and a fit of evaluation loss against tokens, L(D) = E + B·D^(−β), extrapolated to the
reference loss with a bootstrap interval, in tokens and in device-hours at the run's own throughput.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field

from .config import ConfigBase, ConfigError, NonNegative, Positive
from .files import read_jsonl
from .scaling import (
    LossLaw,
    PowerLaw,
    backtest_end,
    backtest_runs,
    curve_from_records,
    fit_loss_law,
    fit_power_law,
    predict_end,
    steps_to_reach,
)

PHI2_BUDGET = {"tokens": 1.4e12, "gpus": 96, "gpu": "A100-80G", "days": 14, "gpu_hours": 96 * 14 * 24}
REACH_LIMIT = 10**13  # steps: past this a run "never" reaches the reference
PHI2_WIKITEXT_LOSS = 2.273  # nats/token: perplexity 9.705 on WikiText-2, 2048-token windows (AutoAWQ PR #496)


def extrapolate(tokens: np.ndarray, losses: np.ndarray, target: float, samples: int = 100,
                seed: int = 0) -> dict:
    """Tokens to reach ``target``: the fit's answer, and a bootstrap interval (residuals resampled)."""
    fit = fit_power_law(tokens, losses)
    point = fit.tokens_to_reach(target)
    rng = np.random.default_rng(seed)
    residuals = np.asarray(losses) - fit.loss(np.asarray(tokens))
    reached: list[float] = []
    unreachable = 0
    for _ in range(samples):
        y = fit.loss(np.asarray(tokens)) + rng.choice(residuals, size=len(residuals), replace=True)
        try:
            d = fit_power_law(tokens, y, start=fit).tokens_to_reach(target)
        except ValueError:
            continue
        if d is None:
            unreachable += 1
        else:
            reached.append(d)
    out = {"fit": asdict(fit), "target": target, "tokens": point, "reachable": point is not None,
           "bootstrap_samples": samples, "bootstrap_unreachable_share": unreachable / samples}
    if reached:
        lo, hi = np.percentile(reached, [5, 95])
        out["tokens_90pct_interval"] = [float(lo), float(hi)]
    return out


TEACHER_FREE = 0.005
"""A feed run whose teacher wrote less than this share of its tokens counts as one without a teacher."""


def data_setting(run: dict) -> str:
    """What a run trained on: 'corpus' (one corpus or a mix, read directly), 'feed' (a feed with no teacher
    text: the feed's path alone) or 'stream' (a feed with teacher text)."""
    data = (run["config"].feed_url or run["config"].data) if run["config"] else None
    if not (data and data.startswith(("http://", "https://"))):
        return "corpus"
    return "stream" if (run["teacher_token_share"] or 0.0) >= TEACHER_FREE else "feed"


def _by_data(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by what they trained on (every feed without teacher text counts as one, every feed with
    it as another): one loss law per group, since a curve on other text is another curve."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        kind = data_setting(run)
        key = {"feed": "a feed, no teacher text", "stream": "a feed with teacher text"}.get(
            kind, (run["config"].data if run["config"] else None) or "unknown data")
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


def _hypothetical(cfg, schedule: str | None = None):
    """The settings of the same run at another length (and, if given, with another schedule): its schedule
    scales with the length (a branch's own decay length does not carry over)."""
    keep_decay = cfg.decay_steps if not cfg.resume_from and (schedule or cfg.lr_schedule) == "wsd" else None
    return cfg.model_copy(update={"lr_decay_steps": None, "max_steps": None, "max_tokens": None,
                                  "decay_steps": keep_decay, "lr_schedule": schedule or cfg.lr_schedule})


def _headline(backtests: list[dict], other_size: bool, base: str) -> dict | None:
    """The backtest closest to the question asked: the largest model held back (another size), a whole run
    held back (several runs), else the end of the run the prediction extends."""
    kinds = ("largest model",) if other_size else ("whole run", "end of run")
    for kind in kinds:
        for b in backtests:
            if b["kind"] == kind and (kind != "end of run" or b["run"] == base):
                return b
    return None


def forecast(runs: list[dict], predict_tokens: float | None = None, predict_model: str | None = None,
             reference: float | None = None, momentum: float | None = None,
             predict_schedule: str | None = None) -> dict:
    """The loss law (``scaling``) fitted over every run, and what it says: the loss of a run of
    ``predict_tokens`` tokens (of ``predict_model``, else the largest model run) with the schedule of the
    longest run of that model (or ``predict_schedule``), and the tokens to reach ``reference``; beside them,
    the backtests of the law and of the plain power law, and the power law's own answer."""
    from .model.config import get_preset
    from .train.optim import schedule_for

    usable = [r for r in runs if r["config"] is not None and len(r["eval"]) > 1]
    if not usable:
        raise ValueError("no run has its config.yaml and evaluations to fit")
    curves = {r["name"]: curve_from_records(r["name"], r["train"], r["eval"], r["parameters"])
              for r in usable}
    law = fit_loss_law(list(curves.values()), momentum)
    biggest = max(r["parameters"] or 0 for r in usable)
    base = max((r for r in usable if (r["parameters"] or 0) == biggest),
               key=lambda r: r["eval"][-1]["tokens"])
    curve, cfg = curves[base["name"]], _hypothetical(base["config"], predict_schedule)
    parameters = get_preset(predict_model).num_parameters if predict_model else base["parameters"]
    if parameters != base["parameters"] and law.K == 0.0:
        raise ValueError("--predict-model needs runs of at least two model sizes: one size says nothing of "
                         "how the loss moves with parameters")

    def schedule(steps: int):
        return schedule_for(cfg, steps).at

    backtests = [b for c in curves.values() if (b := backtest_end(c, momentum=momentum))]
    if (b := backtest_runs(list(curves.values()), momentum)) is not None:
        backtests.append(b)
    headline = _headline(backtests, parameters != base["parameters"], base["name"])
    out = {"model": predict_model or cfg.model, "parameters": parameters, "schedule": cfg.lr_schedule,
           "base_run": base["name"], "tokens_per_step": curve.tokens_per_step, "params": law.to_dict(),
           "backtests": backtests, "backtest": headline,
           "backtest_error": headline["error"] if headline else None}
    power = fit_power_law(curve.tokens, curve.losses) if len({r["parameters"] for r in usable}) == 1 else None
    if power is not None:
        out["power_law"] = {"params": asdict(power)}
    if predict_tokens:
        steps = max(1, round(predict_tokens / curve.tokens_per_step))
        loss, interval = predict_end(law, schedule(steps), steps, parameters)
        out.update(tokens=steps * curve.tokens_per_step, predicted_loss=loss, interval=interval)
        if power is not None:
            out["power_law"]["predicted_loss"] = float(power.loss(predict_tokens))
    if reference is not None:
        reach = [steps_to_reach(law, schedule, reference, parameters, int(curve.steps[-1]), REACH_LIMIT, b)
                 for b in (None, 0, 1)]
        tokens = [None if s is None else s * curve.tokens_per_step for s in reach]
        out["reference"] = {"loss": reference, "tokens": tokens[0], "interval": tokens[1:],
                            "power_law_tokens": power.tokens_to_reach(reference) if power else None}
    return out


# ----------------------------------------------------------------------------------------------------------


def read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    shares = [r["teacher_token_share"] for r in records if r.get("teacher_token_share") is not None]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    config = _run_config(run_dir)
    return {"name": run_dir.name, "dir": str(run_dir), "summary": summary, "config": config,
            "parameters": summary.get("parameters") or (config.preset().num_parameters if config else None),
            "train": [r for r in records if "loss" in r], "eval": [r for r in records if "eval_loss" in r],
            # What a stream run really trained on (every step has the same number of tokens: a plain mean).
            "teacher_token_share": sum(shares) / len(shares) if shares else None}


def _run_config(run_dir: Path):
    """The run's TrainConfig (its config.yaml), or None for a folder without one."""
    from .config import read_yaml
    from .train.config import TrainConfig

    path = run_dir / "config.yaml"
    return TrainConfig.model_validate(read_yaml(path)) if path.exists() else None


def run_label(run: dict) -> str:
    """A run's name, with the share of its tokens a teacher wrote when it trained from a feed."""
    share = run["teacher_token_share"]
    return run["name"] if share is None else f"{run['name']} (teacher {share:.1%} of tokens)"


AXES = ("step", "tokens", "elapsed_s")
"""What the curves are drawn against: steps, tokens, and wall time (the teacher's included where it ran on the
same machine: a distilled run is compared on what it cost)."""


def _plot(runs: list[dict], reference: tuple[str, float] | None, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8), sharey="row")
    data: dict = {}
    for run in runs:
        tr, ev = run["train"], run["eval"]
        data[run["name"]] = {
            "train": {**{x: [r.get(x) for r in tr] for x in AXES}, "loss": [r["loss"] for r in tr]},
            "eval": {**{x: [r.get(x) for r in ev] for x in AXES}, "loss": [r["eval_loss"] for r in ev]}}
        d = data[run["name"]]
        label = run_label(run)
        for j, x in enumerate(AXES):
            axes[0][j].plot(d["train"][x], d["train"]["loss"], label=label, alpha=0.8)
            axes[1][j].plot(d["eval"][x], d["eval"]["loss"], "o-", label=label)
        # a mix of corpora: each one, dotted
        for source in ev[0].get("eval_loss_by_source", {}) if ev else ():
            losses = [r["eval_loss_by_source"][source] for r in ev]
            d["eval"][f"loss[{source}]"] = losses
            for j, x in enumerate(AXES):
                axes[1][j].plot(d["eval"][x], losses, ".:", label=f"{run['name']}: {source}", alpha=0.8)
    for ax in axes[1]:
        if reference:
            ax.axhline(reference[1], color="k", ls="--", lw=1, label=reference[0])
    names = {"step": "steps", "tokens": "tokens", "elapsed_s": "wall time (s)"}
    for i, kind in enumerate(("training", "evaluation")):
        for j, x in enumerate(AXES):
            axes[i][j].set_title(f"{kind} loss vs {names[x]}")
            axes[i][j].set_xlabel(names[x])
            axes[i][j].set_ylabel("loss (nats/token)")
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    (out / "loss_curves.json").write_text(json.dumps(data))
    return data


def reach(evals: list[dict], target: float) -> tuple[float | None, float | None]:
    """Tokens and wall seconds at which a run's evaluations first reach ``target`` (interpolated between
    evaluations, in log tokens), or None."""
    evals = [r for r in evals if r["tokens"] > 0]
    if evals and evals[0]["eval_loss"] <= target:
        return float(evals[0]["tokens"]), float(evals[0]["elapsed_s"])
    for before, after in zip(evals, evals[1:], strict=False):
        if after["eval_loss"] <= target < before["eval_loss"]:
            f = (before["eval_loss"] - target) / (before["eval_loss"] - after["eval_loss"])
            log_tokens = np.log(before["tokens"]) + f * (np.log(after["tokens"]) - np.log(before["tokens"]))
            seconds = before["elapsed_s"] + f * (after["elapsed_s"] - before["elapsed_s"])
            return float(np.exp(log_tokens)), seconds
    return None, None


def distillation(runs: list[dict]) -> dict | None:
    """What a teacher's distribution bought: the tokens and wall time each run took to reach the final
    held-out loss of the first run that does not distil (from the runs' own evaluations), against that run's
    own. None unless some run distils."""
    distils = [r for r in runs if r["config"] is not None and r["config"].distill_weight > 0]
    plain = next((r for r in runs if r["config"] is not None and r["config"].distill_weight == 0
                  and r["eval"]), None)
    if not distils or plain is None:
        return None
    target = plain["eval"][-1]["eval_loss"]
    base_tokens, base_s = reach(plain["eval"], target)
    rows = {}
    for run in runs:
        tokens, seconds = reach(run["eval"], target)
        rows[run["name"]] = {"distill_weight": run["config"].distill_weight if run["config"] else None,
                             "tokens": tokens, "token_ratio": tokens / base_tokens if tokens else None,
                             "seconds": seconds,
                             "time_ratio": seconds / base_s if seconds and base_s else None}
    return {"plain_run": plain["name"], "target": target, "runs": rows}
def _plot_forecast(runs: list[dict], outlook: dict, reference: tuple[str, float] | None, path: Path) -> None:
    """Each run's evaluations with the law along its own schedule; the final loss of a run of every length
    (the base run's schedule) with its 90% band; the power law; the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train.optim import schedule_for

    law = LossLaw.from_dict(outlook["params"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run in runs:
        if run["config"] is None or len(run["eval"]) < 2:
            continue
        c = curve_from_records(run["name"], run["train"], run["eval"], run["parameters"])
        s1, s2 = law.areas(c.rates)
        steps = np.arange(1, len(c.rates) + 1)
        line = ax.plot(c.tokens, c.losses, "o", ms=4, label=f"{run_label(run)}: evaluation, and the law")[0]
        ax.plot(steps * c.tokens_per_step, law.loss(s1[1:], s2[1:], c.parameters), "-", lw=1,
                color=line.get_color(), alpha=0.7)
    base = next(r for r in runs if r["name"] == outlook["base_run"])
    cfg, per_step = _hypothetical(base["config"], outlook["schedule"]), outlook["tokens_per_step"]
    first = base["eval"][-1]["tokens"] / per_step
    last = max(first * 100, (outlook.get("tokens") or 0) / per_step,
               ((outlook.get("reference") or {}).get("tokens") or 0) / per_step) * 1.5
    lengths = np.unique(np.geomspace(max(2, first / 4), last, 60).astype(int))
    ends = [predict_end(law, schedule_for(cfg, int(n)).at, int(n), outlook["parameters"]) for n in lengths]
    x = lengths * per_step
    ax.plot(x, [e[0] for e in ends], "k-", lw=1.5, label=f"end of a {cfg.lr_schedule} run of that length "
                                                           f"({outlook['model']}), 90% band")
    ax.fill_between(x, [e[1][0] for e in ends], [e[1][1] for e in ends], color="k", alpha=0.12)
    if "power_law" in outlook:
        ax.plot(x, PowerLaw(**outlook["power_law"]["params"]).loss(x), "k:", lw=1, label="plain power law")
    if reference:
        ax.axhline(reference[1], color="r", ls="--", lw=1, label=reference[0])
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("evaluation loss (nats/token)")
    error = outlook.get("backtest_error")
    ax.set_title("L = L0 + A·S1^(−α) − C·S2 against the schedule"
                 + (f"; backtest error {error:+.1%}" if error is not None else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_tokens(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def build_report(run_dirs: list[Path], out: Path | None, reference: tuple[str, float] | None = None,
                 extra_eval: dict[str, float] | None = None, predict_tokens: float | None = None,
                 predict_model: str | None = None, momentum: float | None = None,
                 predict_schedule: str | None = None) -> dict:
    """Write report.md, report.json and the PNG plots (with their data as JSON) to ``out`` (None: only
    return the report)."""
    runs = [read_run(Path(d)) for d in run_dirs]
    outlooks = {}
    for data, group in _by_data(runs).items():
        try:
            outlooks[data] = forecast(group, predict_tokens, predict_model,
                                      reference[1] if reference else None, momentum, predict_schedule)
        except ValueError as err:
            outlooks[data] = {"error": str(err)}
    if out is None:
        return {"forecasts": outlooks}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, reference, out)
    rows, fits = [], {}
    for run in runs:
        s, ev = run["summary"], run["eval"]
        final = s.get("final_eval_loss", ev[-1]["eval_loss"] if ev else None)
        # A run stopped without its summary (killed, preempted): what its evaluations say.
        first = ev[0]["eval_loss"] if ev else None
        row = {"run": run["name"], "initial_loss": s.get("initial_eval_loss", first),
               "target_loss": s.get("target_loss"),
               "target_reached": s.get("target_reached"), "final_eval_loss": final, "steps": s.get("steps"),
               "tokens": s.get("tokens"), "tokens_per_s": s.get("tokens_per_s"), "wall_s": s.get("elapsed_s"),
               "teacher_token_share": run["teacher_token_share"], "data": data_setting(run)}
        if extra_eval and run["name"] in extra_eval:
            row["final_loss_on_eval_data"] = extra_eval[run["name"]]
        if reference:
            compare = row.get("final_loss_on_eval_data", final)
            row["gap_to_reference"] = compare - reference[1] if compare is not None else None
            points = [(r["tokens"], r["eval_loss"]) for r in ev if r["tokens"] > 0]
            try:
                f = extrapolate(np.array([p[0] for p in points]), np.array([p[1] for p in points]),
                                reference[1])
                tps = s.get("tokens_per_s") or 0
                if f["tokens"] is not None and tps:
                    f["more_tokens"] = max(0.0, f["tokens"] - (s.get("tokens") or 0))
                    f["device_hours"] = f["more_tokens"] / tps / 3600
                fits[run["name"]] = f
            except ValueError as err:
                fits[run["name"]] = {"error": str(err)}
        rows.append(row)
    for i, (data, outlook) in enumerate(outlooks.items()):
        if "error" not in outlook:
            outlook["plot"] = f"forecast{i or ''}.png"
            _plot_forecast(_by_data(runs)[data], outlook, reference, out / outlook["plot"])
    report = {"runs": rows, "reference": {"name": reference[0], "loss": reference[1]} if reference else None,
              "effects": effects(rows), "distillation": distillation(runs), "forecasts": outlooks,
              "extrapolation": fits,
              "phi2_budget": PHI2_BUDGET}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    ref = report["reference"]
    extra = any("final_loss_on_eval_data" in r for r in report["runs"])
    shares = any(r.get("teacher_token_share") is not None for r in report["runs"])
    lines = ["# scratchlm report", "", "![loss curves](loss_curves.png)", "",
             "| run | initial eval loss | initial − 1 reached at | final eval loss |"
             + (" final loss on the evaluation text |" if extra else "") + " tokens |"
             + (" teacher share of tokens |" if shares else "") + " tokens/s | wall time |",
             "|---|---|---|---|" + ("---|" if extra else "") + "---|" + ("---|" if shares else "")
             + "---|---|"]
    for r in report["runs"]:
        t = r["target_reached"]
        reached = (f"step {t['step']}, {_fmt_tokens(t['tokens'])} tokens, {t['elapsed_s']:.0f} s" if t
                   else "not reached")
        share = r.get("teacher_token_share")
        lines.append(f"| {r['run']} | {_loss(r['initial_loss'])} | {reached} | "
                     f"{_loss(r['final_eval_loss'])} |"
                     + (f" {r['final_loss_on_eval_data']:.3f} |" if extra else "")
                     + f" {_fmt_tokens(r['tokens'])} |"
                     + ((f" {share:.1%} |" if share is not None else " — |") if shares else "")
                     + f" {r['tokens_per_s'] or 0:,.0f} | {r['wall_s'] or 0:.0f} s |")
    if report["effects"]:
        lines += _effects_lines(report["effects"])
    if report["distillation"]:
        lines += _distillation_lines(report["distillation"])
    for data, outlook in report["forecasts"].items():
        lines += _forecast_lines(outlook, ref, data if len(report["forecasts"]) > 1 else None)
    if ref:
        lines += _baseline_lines(report, ref)
    return "\n".join(lines) + "\n"


def _effects_lines(e: dict) -> list[str]:
    """The teacher's effect apart from the path (``effects``)."""
    names = {"corpus": "the corpus, read directly", "feed": "the corpus through the feed, no teacher",
             "stream": "the feed with teacher text"}
    text = ("the same held-out documents" if e["same_text"] else
            "each run's own held-out set (not the same text: `scratchlm report --eval-data` evaluates all "
            "on one)")
    lines = ["", "## Clean against stream, like with like", "",
             f"Final loss on {text}, mean over the runs of each kind:", "", "| trained on | loss |",
             "|---|---|"]
    lines += [f"| {names[k]} | {v:.3f} |" for k, v in e["means"].items()]
    said = {"path": "**The path** (the feed against the corpus, no teacher in either): what the feed's "
                    "loader changes, and nothing else",
            "teacher": "**The teacher** (the stream against the feed with no teacher): what it changes, its "
                       "text and, distilling, its distribution, the path being the same",
            "total": "**Clean against stream** as the seed compared them: both together"}
    lines.append("")
    lines += [f"- {said[k]}: {e[k]:+.3f} nats/token." for k in ("path", "teacher", "total") if k in e]
    return lines


def _distillation_lines(d: dict) -> list[str]:
    lines = ["", f"## What the teacher's distribution bought: tokens to reach {d['plain_run']}'s final "
                 f"evaluation loss ({d['target']:.3f})", "",
             "| run | distillation weight | tokens | × the plain run's | wall time | × the plain run's |",
             "|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        ratio = f"{r['token_ratio']:.2f}" if r["token_ratio"] else "not reached"
        time_ratio = f"{r['time_ratio']:.2f}" if r["time_ratio"] else "—"
        seconds = f"{r['seconds']:.0f} s" if r["seconds"] else "—"
        lines.append(f"| {name} | {r['distill_weight'] if r['distill_weight'] is not None else '—'} | "
                     f"{_fmt_tokens(r['tokens'])} | {ratio} | {seconds} | {time_ratio} |")
    return lines + ["", "Wall time counts the teacher's where it ran on the same machine (a live feed "
                    "scoring or writing beside the trainer); the curves against wall time are in "
                    "loss_curves.png."]


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _law_text(p: dict) -> str:
    size = f" + {p['K']:.3g}·(N/1M)^(−{p['gamma']:.3f})" if p["K"] else ""
    forward = (f"{p['B']:.3g}·(1 − S1^(−{p['alpha']:.3f}))/{p['alpha']:.3f}" if p["L0"] is not None
               else f"{p['B']:.3g}·ln S1")
    return f"L = {p['L1']:.3f}{size} − {forward} − {p['C']:.3g}·S2"


def _floor_text(p: dict) -> str:
    if p["L0"] is None:
        return ("The curve has not begun to level off (α = 0: the loss still falls by the same amount per "
                "doubling), so no floor is measured yet: every answer below assumes it keeps falling that "
                "way, and the tokens to reach a loss are a lower bound.")
    size = "" if p["K"] else " for this model size"
    return f"It levels off at L0 = {p['L0']:.3f} nats/token{size}."


def _forecast_lines(f: dict, ref: dict | None, data: str | None) -> list[str]:
    """How much more training: the loss law's answers, each beside the backtest that says how far to trust
    it, and the plain power law's."""
    lines = ["", "## How much more training" + (f": the runs on {data}" if data else ""), ""]
    if "error" in f:
        return lines + [f"No forecast: {f['error']}."]
    p = f["params"]
    lines += [f"Fitted to {p['points']} evaluations: **{_law_text(p)}** (S1: the summed learning rate, S2: "
              "the annealing area, both in steps at the peak rate; residual "
              f"{p['residual_rms']:.3f} nats/token). " + _floor_text(p)]
    if not p["annealing_seen"]:
        lines += ["", "No fitted run has a falling rate, so what a final decay gains is unknown (C = 0 "
                  "here): branch one off a checkpoint (`scratchlm train --resume-from CKPT "
                  "--decay-steps N`)."]
    pl = f.get("power_law", {})
    if "predicted_loss" in f:
        lo, hi = f["interval"]
        lines += ["", f"**A {f['schedule']} run of {_fmt_tokens(f['tokens'])} tokens ({f['model']}) ends at "
                  f"{f['predicted_loss']:.3f}** nats/token (90% interval {lo:.3f}–{hi:.3f}, from the fit's "
                  "uncertainty)" + (f"; the plain power law says {pl['predicted_loss']:.3f}." if pl else ".")]
    if ref and f.get("reference"):
        r = f["reference"]
        floor_above = p["L0"] is not None and p["L0"] > ref["loss"]
        reach = (f"**{_fmt_tokens(r['tokens'])} tokens** (90% interval {_fmt_tokens(r['interval'][0])}–"
                 f"{_fmt_tokens(r['interval'][1]) if r['interval'][1] else 'never'})" if r["tokens"]
                 else "**out of reach**" + (" at this model size" if floor_above else
                                            f" within {_fmt_tokens(REACH_LIMIT * f['tokens_per_step'])} "
                                            "tokens"))
        baseline = (_fmt_tokens(r["power_law_tokens"]) if r["power_law_tokens"]
                    else "never (it levels off above)")
        lines += ["", f"To reach {ref['name']} ({ref['loss']:.3f}): {reach}"
                  + (f"; the plain power law: {baseline}." if pl else ".")]
    b = f["backtest"]
    lines += ["", f"**Backtest error {b['error']:+.1%}** ({b['kind']}, {b['run']}: {b['held_back']}, "
              f"predicted {b['predicted']:.3f} for {b['actual']:.3f} at step {b['step']}): read the numbers "
              "above with it; the further an answer reaches past the runs, the less it holds."
              if b else "No backtest: the runs are too short to hold a part back (evaluate more often)."]
    lines += ["", "| backtest | held back | run | actual | loss law | plain power law |",
              "|---|---|---|---|---|---|"]
    for t in f["backtests"]:
        base = t.get("power_law")
        lines.append(f"| {t['kind']} | {t['held_back']} | {t['run']} | {t['actual']:.3f} | "
                     f"{t['predicted']:.3f} ({t['error']:+.1%}) | "
                     + (f"{base['predicted']:.3f} ({base['error']:+.1%})" if base else "—") + " |")
    return lines + ["", f"![forecast]({f['plot']})"]


def _baseline_lines(report: dict, ref: dict) -> list[str]:
    lines = ["", f"## Against {ref['name']}: {ref['loss']:.3f} nats/token", ""]
    for r in report["runs"]:
        f = report["extrapolation"].get(r["run"], {})
        gap = r.get("gap_to_reference")
        lines.append(f"**{r['run']}**: final loss {gap:+.3f} nats/token from the reference."
                     if gap is not None else f"**{r['run']}**: no final loss.")
        if "error" in f:
            lines.append(f"No power-law fit: {f['error']}.")
            continue
        fit = f["fit"]
        law = f"The plain power law L(D) = {fit['E']:.3f} + {fit['B']:.3g}·(D/1M)^(−{fit['beta']:.3f})"
        if not f.get("reachable"):
            lines.append(f"{law} levels off at E = {fit['E']:.3f}, above the reference: out of reach by it.")
        else:
            interval = f.get("tokens_90pct_interval")
            unc = (f" (90% bootstrap interval {_fmt_tokens(interval[0])}–{_fmt_tokens(interval[1])}; "
                   f"{f['bootstrap_unreachable_share']:.0%} of resamples never reach it)" if interval else "")
            hours = f.get("device_hours")
            lines.append(f"{law} reaches it after {_fmt_tokens(f['tokens'])} tokens{unc}"
                         + (f", about {hours:,.0f} device-hours at this run's {r['tokens_per_s']:,.0f} "
                            "tokens/s." if hours is not None else "."))
        lines.append("")
    b = report["phi2_budget"]
    return lines + [f"For scale, Phi-2 itself: {_fmt_tokens(b['tokens'])} tokens on {b['gpus']} × {b['gpu']} "
                    f"for {b['days']} days ({b['gpu_hours']:,} GPU-hours).", ""]


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


def _measured(cfg: ReportConfig) -> tuple[tuple[str, float] | None, dict[str, float]]:
    """Every run's final model's loss on --eval-data (one text for all: like with like) and, with
    --reference-model, the reference model's on the same text."""
    from .devices import pick_device
    from .evaluation import evaluate_model, whole_documents
    from .tokenizer import load_tokenizer

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
    return build_report([Path(d) for d in cfg.runs], Path(cfg.out) if cfg.out else None, reference, extra,
                        cfg.predict_tokens, cfg.predict_model, cfg.annealing_momentum, cfg.predict_schedule)


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
