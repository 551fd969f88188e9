""""How much more training": the loss law fitted over the runs and extrapolated to a reference loss (Phi-2's),
in tokens, with its interval and the backtest that says how far to trust it. Runs of three sizes or more are
read as a ladder (``report.ladder``): L(N, D) with N counted the way the ladder's backtest prefers, an
iso-FLOP reading, and the floor of each size; a ladder read before (``--ladder``) gives one run the floor its
size cannot show alone. One answer per question: the plain power law is a row of the backtest table.
"""

from __future__ import annotations

import numpy as np

from .backtest import backtest_end, backtest_runs
from .ladder import Ladder, answer_for, fit_ladder, iso_flops, sizes_of
from .law import fit_loss_law, predict_end, steps_to_reach
from .runs import Run

REACH_LIMIT = 10**13  # steps: past this a run "never" reaches the reference


def hypothetical(cfg, schedule: str | None = None):
    """The settings of the same run at another length (and, if given, with another schedule): its schedule
    scales with the length (a branch's own decay length does not carry over)."""
    keep_decay = cfg.decay_steps if not cfg.resume_from and (schedule or cfg.lr_schedule) == "wsd" else None
    return cfg.model_copy(update={"lr_decay_steps": None, "max_steps": None, "max_tokens": None,
                                  "decay_steps": keep_decay, "lr_schedule": schedule or cfg.lr_schedule})


def _headline(backtests: list[dict], other_size: bool, base: str) -> dict | None:
    """The backtest closest to the question asked: the largest model held back, the furthest reach first
    (another size), a whole run held back (several runs), else the end of the run the prediction extends."""
    if other_size:
        largest = [b for b in backtests if b["kind"] == "largest model"]
        return max(largest, key=lambda b: b.get("reach", 1.0)) if largest else None
    for kind in ("whole run", "end of run"):
        for b in backtests:
            if b["kind"] == kind and (kind != "end of run" or b["run"] == base):
                return b
    return None


def _backtests(curves: list, ladder: Ladder | None, momentum: float | None) -> list[dict]:
    rows = [b for c in curves if (b := backtest_end(c, momentum=momentum))]
    if ladder is not None:
        return rows + [b for b in ladder.backtests if b["count"] == ladder.count]
    if (b := backtest_runs(curves, momentum)) is not None:
        rows.append(b)
    return rows


def forecast(runs: list[Run], predict_tokens: float | None = None, predict_model: str | None = None,
             reference: float | None = None, momentum: float | None = None,
             predict_schedule: str | None = None, known_ladder: Ladder | None = None) -> dict:
    """The loss law fitted over every run (read as a ladder from three sizes up), and what it says: the loss
    of a run of ``predict_tokens`` tokens (of ``predict_model``, else the largest model run) with the schedule
    of the longest run of that model (or ``predict_schedule``), and the tokens to reach ``reference``, never
    below the floor a ladder measures for that size (``known_ladder``: one read before, for runs of fewer
    sizes); beside them, the backtests."""
    from ..model.config import get_preset
    from ..training.optim import schedule_for

    usable = [r for r in runs if r.config is not None and len(r.evals) > 1]
    if not usable:
        raise ValueError("no run has its config.yaml and evaluations to fit")
    ladder = fit_ladder(usable, momentum) if len(sizes_of(usable)) >= 3 else None
    count = ladder.count if ladder else "total"
    curves = {r.name: r.curve(count) for r in usable}
    law = ladder.law if ladder else fit_loss_law(list(curves.values()), momentum)
    base = max(sizes_of(usable)[-1], key=lambda r: r.evals[-1].tokens)
    curve, cfg = curves[base.name], hypothetical(base.config, predict_schedule)
    model = get_preset(predict_model) if predict_model else base.model
    parameters = curve.parameters if model.name == base.model.name else (
        model.num_parameters if count == "total" else model.num_non_embedding_parameters)
    if parameters != curve.parameters and law.K == 0.0:
        raise ValueError("--predict-model needs runs of at least two model sizes: one size says nothing of "
                         "how the loss moves with parameters")
    size_ladder = ladder or known_ladder
    floor = size_ladder.floor(model) if size_ladder else None

    def schedule(steps: int):
        return schedule_for(cfg, steps).at

    backtests = _backtests(list(curves.values()), ladder, momentum)
    headline = _headline(backtests, parameters != curve.parameters, base.name)
    out = {"model": model.name, "parameters": parameters, "count": count, "schedule": cfg.lr_schedule,
           "base_run": base.name, "tokens_per_step": curve.tokens_per_step, "params": law.to_dict(),
           "floor": floor, "floor_from": size_ladder.source if floor is not None else None,
           "backtests": backtests, "backtest": headline,
           "backtest_error": headline["error"] if headline else None}
    if ladder is not None:
        budgets = _budgets(usable, count)
        out["ladder"] = {**ladder.to_dict(), "iso_flops": iso_flops(ladder, schedule, budgets)}
    # One law answers every question of this group, and the plot draws it: the runs' own, or, where a ladder
    # read before gives their size a floor and their curve shows none, or one above the ladder's (a short
    # curve's fit, not the model's: the ladder's longer runs of that size went below it), the ladder's L(N, D)
    # at their size.
    use_ladder = size_ladder is not None and floor is not None and (law.floor is None or law.floor > floor)
    answer_law, answer_n = (size_ladder.law, size_ladder.size(model)) if use_ladder else (law, parameters)
    out["answer_law"] = {"params": answer_law.to_dict(), "parameters": answer_n,
                         "from": size_ladder.source if use_ladder else "these runs' law"}
    out["last_eval"] = {"tokens": base.evals[-1].tokens, "loss": base.evals[-1].eval_loss}
    if predict_tokens:
        steps = max(1, round(predict_tokens / curve.tokens_per_step))
        loss, interval = predict_end(answer_law, schedule(steps), steps, answer_n, floor or 0.0)
        out.update(tokens=steps * curve.tokens_per_step, predicted_loss=loss, interval=interval)
        if ladder is not None:
            out["answer"] = answer_for(ladder, model, predict_tokens, schedule, float(curve.tokens[-1]),
                                       reference)
    if reference is not None:
        out["reference"] = _reach(answer_law, schedule, reference, answer_n, int(curve.steps[-1]), floor,
                                  curve.tokens_per_step, size_ladder)
        out["reference"]["law"] = out["answer_law"]["from"]
    return out


def _reach(law, schedule, reference: float, parameters: float, start: int, floor: float | None,
           tokens_per_step: float, size_ladder: Ladder | None) -> dict:
    """Tokens to reach ``reference`` at this size, with the interval; or, where the size's floor lies above
    it, "out of reach at this size" with the floor and the size whose floor lies below; or, where a ladder
    was read but shows no floor at any size, no count at all: whether the size ever gets there is then not
    measured, and a count from a law that falls forever would claim it is."""
    if size_ladder is not None and floor is None:
        return {"loss": reference, "tokens": None, "interval": [None, None], "out_of_reach": None,
                "floor": None, "floor_unmeasured": True, "ladder": size_ladder.source}
    if floor is not None and floor > reference:
        needed = size_ladder.law.parameters_to_reach(reference)
        return {"loss": reference, "tokens": None, "interval": [None, None], "out_of_reach": True,
                "floor": floor, "size_to_reach": needed, "count": size_ladder.count}
    reach = [steps_to_reach(law, schedule, reference, parameters, start, REACH_LIMIT, b, floor or 0.0)
             for b in (None, 0, 1)]
    tokens = [None if s is None else s * tokens_per_step for s in reach]
    return {"loss": reference, "tokens": tokens[0], "interval": tokens[1:], "out_of_reach": tokens[0] is None,
            "floor": floor}


def _budgets(runs: list[Run], count) -> list[float]:
    """Compute budgets for the iso-FLOP reading (6·N·D, N as the ladder counts it): from the ladder's
    smallest run to 10^4 times its largest."""
    spent = [6 * r.count(count) * r.evals[-1].tokens for r in runs]
    return [float(b) for b in np.geomspace(min(spent), max(spent) * 1e4, 6)]
