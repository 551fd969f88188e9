"""The report as Markdown: the runs' table, clean against stream, distillation, the forecast with its
backtests, the gap to the reference.
"""

from __future__ import annotations

from .forecast import REACH_LIMIT


def _fmt_tokens(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def markdown(report: dict) -> str:
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
    if report["comparisons"]:
        lines += _comparison_lines(report["comparisons"])
    forecasts = list(report["forecasts"].items())
    if forecasts:  # one answer, in full, for the first group; the others a line each
        data, outlook = forecasts[0]
        lines += _forecast_lines(outlook, ref, data if len(forecasts) > 1 else None)
    if ref and len(forecasts) > 1:
        lines += ["", "The other runs, from their own law (or the ladder's at their size):", ""]
        for data, f in forecasts[1:]:
            if "error" in f:
                lines.append(f"- {data}: no forecast ({f['error']})")
                continue
            error = f.get("backtest_error")
            lines.append(f"- {data}: to reach {ref['name']}: {_reach_text(f['reference'], ref, f)}; backtest "
                         + (f"error {error:+.1%}" if error is not None else "none"))
    if ref:
        lines += _baseline_lines(report, ref)
    return "\n".join(lines) + "\n"


def _comparison_lines(c: dict) -> list[str]:
    """Each run against its control (tokens and wall time to the control's final loss, the teacher's own
    seconds apart), then the questions the runs answer, each against the seed spread of a control."""
    from .runs import ANSWERS, KINDS

    text = ("the same held-out documents" if c["same_text"] else
            "each run's own held-out set (not the same text: `scratchlm report --eval-data` evaluates all "
            "on one)")
    lines = ["", "## What the teacher buys: each run against its control", "",
             f"Final loss on {text}; tokens and wall time to reach the control's final evaluation loss, "
             "from the runs' own evaluations (the same held-out blocks for all); the teacher's seconds are "
             "the time its engine spent scoring and writing during the run, on the same machine (inside the "
             "wall time).", "",
             "| run | trained on | final loss | control | tokens to reach | × control's | wall time to "
             "reach | × control's | teacher's seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in c["runs"].items():
        ratio = (f"{r['token_ratio']:.2f}" if r.get("token_ratio") else
                 "not reached" if r.get("target") is not None else "—")
        seconds = f"{r['seconds']:.0f} s" if r.get("seconds") else "—"
        time_ratio = f"{r['time_ratio']:.2f}" if r.get("time_ratio") else "—"
        teacher = f"{r['teacher_seconds']:.0f} s" if r.get("teacher_seconds") is not None else "—"
        lines.append(f"| {name} | {KINDS[r['kind']]} | {_loss(r['loss'])} | {r['control'] or '—'} | "
                     f"{_fmt_tokens(r.get('tokens'))} | {ratio} | {seconds} | {time_ratio} | {teacher} |")
    spread = c["spread"]
    lines += ["", "Mean final loss of each kind less its control's:", ""]
    lines += [f"- {ANSWERS[k][2]}: {v:+.3f} nats/token" + (
        f" ({abs(v) / spread['nats']:.1f}× the seed spread)" if spread and spread["nats"] > 0 else "") + (
        f" (measured against the {c['answered_against'][k]} run: there is no {ANSWERS[k][1]} run)"
        if c["answered_against"][k] != ANSWERS[k][1] else "") + "."
        for k, v in c["answers"].items()]
    if spread:
        lines += ["", f"Two seeds of the same control land {spread['nats']:.3f} nats apart "
                  f"({spread['from']}): a difference of that size is not told apart from the seed."]
    return lines


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


def _reach_text(r: dict, ref: dict, f: dict) -> str:
    """The answer to "how many tokens to reach the reference", or why there is none at this size."""
    if r.get("floor_unmeasured"):
        return (f"**no token count**: {r['ladder']} shows no floor at any of its sizes yet (its curves still "
                "fall by the same amount per doubling), so whether a model of this size ever reaches it is "
                "not measured, and a count from a law that falls forever would claim it does; longer ladder "
                "runs, until the smallest size levels off, would answer it")
    if r.get("floor") is not None and r["floor"] > ref["loss"]:
        needed = r.get("size_to_reach")
        count = "non-embedding " if r.get("count") == "non_embedding" else ""
        return (f"**out of reach at this size**: the ladder's floor for {f['model']} is {r['floor']:.3f} "
                "nats/token, above it" + (f"; a model of about {_fmt_tokens(needed)} {count}parameters "
                                          "has its floor below" if needed else
                                          "; no size of the ladder's law has its floor below"))
    if r["tokens"]:
        return (f"**{_fmt_tokens(r['tokens'])} tokens** (90% interval {_fmt_tokens(r['interval'][0])}–"
                f"{_fmt_tokens(r['interval'][1]) if r['interval'][1] else 'never'}; from {r['law']})")
    return f"**out of reach** within {_fmt_tokens(REACH_LIMIT * f['tokens_per_step'])} tokens"


def _forecast_lines(f: dict, ref: dict | None, data: str | None) -> list[str]:
    """How much more training: the loss law's answers, each beside the backtest that says how far to trust
    it; the plain power law is a row of the backtest table."""
    lines = ["", "## How much more training" + (f": the runs on {data}" if data else ""), ""]
    if "error" in f:
        return lines + [f"No forecast: {f['error']}."]
    p = f["params"]
    lines += [f"Fitted to {p['points']} evaluations: **{_law_text(p)}** (S1: the summed learning rate, S2: "
              "the annealing area, both in steps at the peak rate; residual "
              f"{p['residual_rms']:.3f} nats/token). " + _floor_text(p)]
    if f.get("floor") is not None:
        lines += ["", f"The floor of {f['model']} from {f['floor_from']}: {f['floor']:.3f} nats/token (no "
                  "answer below goes under it)."]
    if not p["annealing_seen"]:
        lines += ["", "No fitted run has a falling rate, so what a final decay gains is unknown (C = 0 "
                  "here): branch one off a checkpoint (`scratchlm train --resume-from CKPT "
                  "--decay-steps N`)."]
    if "predicted_loss" in f:
        lo, hi = f["interval"]
        lines += ["", f"**A {f['schedule']} run of {_fmt_tokens(f['tokens'])} tokens ({f['model']}) ends at "
                  f"{f['predicted_loss']:.3f}** nats/token (90% interval {lo:.3f}–{hi:.3f}, from the fit's "
                  "uncertainty)" + (": zero is where the law was cut, a cross-entropy goes no lower; at this "
                                    "reach the law says nothing" if f["predicted_loss"] <= 0 else ".")]
    if ref and f.get("reference"):
        lines += ["", f"To reach {ref['name']} ({ref['loss']:.3f}): {_reach_text(f['reference'], ref, f)}."]
    b = f["backtest"]
    lines += ["", f"**Backtest error {b['error']:+.1%}** ({b['kind']}, {b['run']}: {b['held_back']}, "
              f"predicted {b['predicted']:.3f} for {b['actual']:.3f} at step {b['step']}): read the numbers "
              "above with it; the further an answer reaches past the runs, the less it holds."
              if b else "No backtest: the runs are too short to hold a part back (evaluate more often)."]
    lines += ["", "| backtest | held back | run | actual | loss law | plain power law (baseline) |",
              "|---|---|---|---|---|---|"]
    for t in f["backtests"]:
        base = t.get("power_law")
        lines.append(f"| {t['kind']} | {t['held_back']} | {t['run']} | {t['actual']:.3f} | "
                     f"{t['predicted']:.3f} ({t['error']:+.1%}) | "
                     + (f"{base['predicted']:.3f} ({base['error']:+.1%})" if base else "—") + " |")
    if "ladder" in f:
        lines += _ladder_lines(f["ladder"], f.get("answer"), ref)
    return lines + ["", f"![forecast]({f['plot']})"]


COUNT_NAMES = {"total": "all parameters (Chinchilla's N)",
               "non_embedding": "non-embedding parameters (Kaplan's N: no embedding, no LM head)"}


def _ladder_lines(ladder: dict, answer: dict | None, ref: dict | None) -> list[str]:
    """The ladder: its sizes, which N it is fitted in and why, the largest size's backtests, the iso-FLOP
    reading and the answer for the model asked about."""
    count = ladder["count"]
    lines = ["", "### The model-size ladder", "", "| size | parameters | non-embedding | runs |",
             "|---|---|---|---|"]
    lines += [f"| {s['model']} | {s['total']:,} | {s['non_embedding']:,} | {', '.join(s['runs'])} |"
              for s in ladder["sizes"]]
    errors = ", ".join(f"{COUNT_NAMES[k]} {v:.1%}" for k, v in ladder["errors"].items())
    lines += ["", f"N is counted as **{COUNT_NAMES[count]}**: the largest size's final losses, predicted "
              f"from the smaller sizes, miss by {errors} on average.", "",
              "| N counted as | largest-size run | its tokens | × the smaller sizes' | actual | predicted |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {b['count']} | {b['run']} | {_fmt_tokens(b['tokens'])} | {b['reach']:.1f} | "
              f"{b['actual']:.3f} | {b['predicted']:.3f} ({b['error']:+.1%}) |" for b in ladder["backtests"]]
    if ladder.get("iso_flops"):
        lines += ["", "Iso-FLOP reading (compute 6·N·D, N as counted above): the size whose run ends lowest "
                  "for each budget.", "", "| FLOPs | best N | tokens | tokens per parameter | loss |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['flops']:.2g} | {_fmt_tokens(r['parameters'])}"
                  + (" (edge of the search)" if r["at_search_edge"] else "")
                  + f" | {_fmt_tokens(r['tokens'])} | {r['tokens_per_parameter']:.1f} | {r['loss']:.3f} |"
                  for r in ladder["iso_flops"]]
        lines += ["", "Chinchilla's compute-optimal runs have about 20 tokens per parameter."]
    if answer:
        lo, hi = answer["interval"]
        lines += ["", f"**{answer['model']} ({_fmt_tokens(answer['parameters'])} parameters as counted) "
                  f"after {_fmt_tokens(answer['tokens'])} tokens: {answer['loss']:.3f}** nats/token (90% "
                  f"interval {lo:.3f}–{hi:.3f})"
                  + (f", against its reference {ref['loss']:.3f} ({ref['name']})" if ref else "")
                  + f". That reaches {answer['extrapolation_in_n']:,.0f}× past the ladder's largest size and "
                  f"{answer['extrapolation_in_d']:,.0f}× past its longest run; the ladder's own backtest "
                  f"missed by {answer['backtest_error']:+.1%} at a {answer['backtest_reach']:.0f}× reach in "
                  "tokens. More sizes (toward the model asked about) and longer runs would make it more "
                  "trustworthy; at this reach it is an order of magnitude, not a measurement."]
    return lines


def _baseline_lines(report: dict, ref: dict) -> list[str]:
    lines = ["", f"## Against {ref['name']}: {ref['loss']:.3f} nats/token", ""]
    for r in report["runs"]:
        gap = r.get("gap_to_reference")
        lines.append(f"- **{r['run']}**: final loss {gap:+.3f} nats/token from the reference."
                     if gap is not None else f"- **{r['run']}**: no final loss.")
    b = report["phi2_budget"]
    return lines + ["", f"For scale, Phi-2 itself: {_fmt_tokens(b['tokens'])} tokens on {b['gpus']} × "
                    f"{b['gpu']} for {b['days']} days ({b['gpu_hours']:,} GPU-hours).", ""]
