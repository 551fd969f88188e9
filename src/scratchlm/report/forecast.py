""""How much more training": the loss law fitted over the runs and extrapolated to a reference loss (Phi-2's),
in tokens and device-hours, with its interval and its backtests; the power law's bootstrap extrapolation as
the baseline.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .backtest import backtest_end, backtest_runs, fit_power_law
from .law import curve_from_records, fit_loss_law, predict_end, steps_to_reach

REACH_LIMIT = 10**13  # steps: past this a run "never" reaches the reference


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


def hypothetical(cfg, schedule: str | None = None):
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
    from ..model.config import get_preset
    from ..train.optim import schedule_for

    usable = [r for r in runs if r["config"] is not None and len(r["eval"]) > 1]
    if not usable:
        raise ValueError("no run has its config.yaml and evaluations to fit")
    curves = {r["name"]: curve_from_records(r["name"], r["train"], r["eval"], r["parameters"])
              for r in usable}
    law = fit_loss_law(list(curves.values()), momentum)
    biggest = max(r["parameters"] or 0 for r in usable)
    base = max((r for r in usable if (r["parameters"] or 0) == biggest),
               key=lambda r: r["eval"][-1]["tokens"])
    curve, cfg = curves[base["name"]], hypothetical(base["config"], predict_schedule)
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
