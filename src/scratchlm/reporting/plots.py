"""The report's figures: every run's loss against steps, tokens and wall time on one figure, and the forecast
(the law's curve and band against the runs' evaluations).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .forecast import hypothetical
from .law import LossLaw, predict_end
from .runs import Run

AXES = ("step", "tokens", "elapsed_s")
"""What the curves are drawn against: steps, tokens, and wall time (the teacher's included where it ran on the
same machine: a distilled run is compared on what it cost)."""


def plot_runs(runs: list[Run], reference: tuple[str, float] | None, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8), sharey="row")
    data: dict = {}
    for run in runs:
        tr, ev = run.train, run.evals
        data[run.name] = {  # a distilled run's training curve is its cross-entropy: comparable with the rest
            "train": {**{x: [getattr(r, x) for r in tr] for x in AXES},
                      "loss": [r.next_token_loss for r in tr]},
            "eval": {**{x: [getattr(r, x) for r in ev] for x in AXES}, "loss": [r.eval_loss for r in ev]}}
        d = data[run.name]
        label = run.label
        for j, x in enumerate(AXES):
            axes[0][j].plot(d["train"][x], d["train"]["loss"], label=label, alpha=0.8)
            axes[1][j].plot(d["eval"][x], d["eval"]["loss"], "o-", label=label)
        # a mix of corpora: each one, dotted
        for source in ev[0].eval_loss_by_source if ev else ():
            losses = [r.eval_loss_by_source[source] for r in ev]
            d["eval"][f"loss[{source}]"] = losses
            for j, x in enumerate(AXES):
                axes[1][j].plot(d["eval"][x], losses, ".:", label=f"{run.name}: {source}", alpha=0.8)
    for ax in axes[1]:
        if reference:
            ax.axhline(reference[1], color="k", ls="--", lw=1, label=reference[0])
    names = {"step": "steps", "tokens": "tokens", "elapsed_s": "wall time (s)"}
    for i, kind in enumerate(("training (cross-entropy)", "evaluation")):
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
def plot_forecast(runs: list[Run], outlook: dict, reference: tuple[str, float] | None, path: Path) -> None:
    """Each run's evaluations with the law along its own schedule; the final loss of a run of every length
    (the base run's schedule) with its 90% band, never below zero or the size's floor; the reference. What
    is drawn is also written as JSON beside the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.optim import schedule_for

    law = LossLaw.from_dict(outlook["params"])
    floor = outlook.get("floor") or 0.0
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn: dict = {"runs": {}}
    for run in runs:
        if run.config is None or len(run.evals) < 2:
            continue
        c = run.curve(outlook["count"])
        s1, s2 = law.areas(c.rates)
        steps = np.arange(1, len(c.rates) + 1)
        line = ax.plot(c.tokens, c.losses, "o", ms=4, label=f"{run.label}: evaluation, and the law")[0]
        fitted = np.maximum(floor, law.loss(s1[1:], s2[1:], c.parameters))
        ax.plot(steps * c.tokens_per_step, fitted, "-", lw=1, color=line.get_color(), alpha=0.7)
        drawn["runs"][run.name] = {"tokens": (steps * c.tokens_per_step).tolist(), "law": fitted.tolist()}
    # The curve the answers come from (outlook["answer_law"]), from the base run's last evaluation on: the
    # final loss of a run of each length, and its band, never above that evaluation nor rising with more
    # training (a longer run of the same schedule ends no higher), never below the floor.
    base = next(r for r in runs if r.name == outlook["base_run"])
    answer = outlook["answer_law"]
    answer_law = LossLaw.from_dict(answer["params"])
    cfg, per_step = hypothetical(base.config, outlook["schedule"]), outlook["tokens_per_step"]
    first = base.evals[-1].tokens / per_step
    last = max(first * 100, (outlook.get("tokens") or 0) / per_step,
               ((outlook.get("reference") or {}).get("tokens") or 0) / per_step) * 1.5
    lengths = np.unique(np.geomspace(first, last, 80).astype(int))
    ends = [predict_end(answer_law, schedule_for(cfg, int(n)).at, int(n), answer["parameters"], floor)
            for n in lengths]
    ceiling = outlook["last_eval"]["loss"]
    loss, low, high = (np.minimum.accumulate(np.minimum(ceiling, values)).tolist() for values in (
        [e[0] for e in ends], [e[1][0] for e in ends], [e[1][1] for e in ends]))
    x = lengths * per_step
    ax.plot(x, loss, "k-", lw=1.5, label=f"end of a {cfg.lr_schedule} run of that length "
                                          f"({outlook['model']}; {answer['from']}), 90% band")
    ax.fill_between(x, low, high, color="k", alpha=0.12)
    drawn["ends"] = {"tokens": x.tolist(), "loss": loss, "low": low, "high": high, "law": answer["from"]}
    if outlook.get("floor") is not None:
        ax.axhline(floor, color="k", ls=":", lw=1,
                   label=f"{outlook['model']}'s floor ({outlook['floor_from']})")
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
    path.with_suffix(".json").write_text(json.dumps(drawn))
