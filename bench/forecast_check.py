"""Check "how much more training" on finished runs: the loss law against the plain power law.

    python bench/forecast_check.py --short runs/wsd100 --long runs/wsd400 [--others runs/const400 ...]

Prints, for the short run alone, its forecast of the long run's final evaluation loss (the loss law and the
plain power law, with the law's 90% interval and the short run's own backtest error), then every backtest
(``scratchlm.reporting.backtest``) on every run given, for both models, as Markdown rows for
bench/RESULTS.md.
No timing: this measures how right the answers are, not how fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scratchlm.reporting.backtest import backtest_end, backtest_runs, fit_power_law
from scratchlm.reporting.command import ReportRequest, build_report
from scratchlm.reporting.runs import read_run


def _row(b: dict) -> str:
    base = b.get("power_law")
    return (f"| {b['kind']} | {b['run']}: {b['held_back']} | {b['actual']:.3f} | {b['predicted']:.3f} "
            f"({b['error']:+.1%}) | " + (f"{base['predicted']:.3f} ({base['error']:+.1%})" if base else "—")
            + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=Path, required=True)
    parser.add_argument("--long", type=Path, required=True)
    parser.add_argument("--others", type=Path, nargs="*", default=[])
    args = parser.parse_args()

    actual = json.loads((args.long / "summary.json").read_text())
    request = ReportRequest([args.short], predict_tokens=actual["tokens"])
    (outlook,) = build_report(request)["forecasts"].values()
    err = (outlook["predicted_loss"] - actual["final_eval_loss"]) / actual["final_eval_loss"]
    short = read_run(args.short).curve()
    power = float(fit_power_law(short.tokens, short.losses).loss(actual["tokens"]))
    print(f"{args.short.name} alone predicts {args.long.name}'s final evaluation loss "
          f"({actual['tokens']:,} tokens, actual {actual['final_eval_loss']:.3f}):")
    lo, hi = outlook["interval"]
    print(f"  loss law   {outlook['predicted_loss']:.3f} ({err:+.1%}), 90% interval {lo:.3f}-{hi:.3f}; "
          f"its own backtest error {outlook['backtest_error']:+.1%}")
    power_err = (power - actual["final_eval_loss"]) / actual["final_eval_loss"]
    print(f"  power law  {power:.3f} ({power_err:+.1%})")
    print()
    print("| backtest | held back | actual | loss law | plain power law |")
    print("|---|---|---|---|---|")
    curves = [read_run(d).curve() for d in (args.short, args.long, *args.others)]
    for curve in curves:
        if (b := backtest_end(curve)) is not None:
            print(_row(b))
    for group in ([curves[0], curves[1]], curves):
        if len(group) > 1 and (b := backtest_runs(group)) is not None:
            print(_row(b).replace("the longest run", f"the longest of {', '.join(c.name for c in group)}"))


if __name__ == "__main__":
    main()
