"""The report's figures: every run's loss against steps, tokens and wall time on one figure, and the forecast
(the law's curve and band against the runs' evaluations).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .backtest import PowerLaw
from .forecast import hypothetical
from .law import LossLaw, curve_from_records, predict_end
from .runs import run_label

AXES = ("step", "tokens", "elapsed_s")
"""What the curves are drawn against: steps, tokens, and wall time (the teacher's included where it ran on the
same machine: a distilled run is compared on what it cost)."""


def plot_runs(runs: list[dict], reference: tuple[str, float] | None, out: Path) -> dict:
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
def plot_forecast(runs: list[dict], outlook: dict, reference: tuple[str, float] | None, path: Path) -> None:
    """Each run's evaluations with the law along its own schedule; the final loss of a run of every length
    (the base run's schedule) with its 90% band; the power law; the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.optim import schedule_for

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
    cfg, per_step = hypothetical(base["config"], outlook["schedule"]), outlook["tokens_per_step"]
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
