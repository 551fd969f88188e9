"""``scratchlm report``: compare runs (clean vs stream), plot them, and say how much more training it would
take.

For each run: the loss curves (training and evaluation, against steps and against tokens, all runs on one
figure), a table (initial loss, when initial − 1 was reached, final loss, throughput, wall time), the gap to a
reference (Phi-2), and a fit of evaluation loss against tokens, L(D) = E + B·D^(−β), extrapolated to the
reference loss with a bootstrap interval, in tokens and in device-hours at the run's own throughput.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .config import ConfigBase, ConfigError
from .files import read_jsonl

PHI2_BUDGET = {"tokens": 1.4e12, "gpus": 96, "gpu": "A100-80G", "days": 14, "gpu_hours": 96 * 14 * 24}
PHI2_WIKITEXT_LOSS = 2.273  # nats/token: perplexity 9.705 on WikiText-2, 2048-token windows (AutoAWQ PR #496)
TOKEN_UNIT = 1e6  # the fit works in millions of tokens, keeping B and D of similar magnitude


@dataclass
class Fit:
    """L(D) = E + B·D^(−β), D in tokens."""

    E: float
    B: float
    beta: float
    points: int

    def loss(self, tokens: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.B * (np.asarray(tokens) / TOKEN_UNIT) ** (-self.beta)

    def tokens_to_reach(self, target: float) -> float | None:
        """Tokens at which the curve reaches ``target``; None if it never does (E at or above the target)."""
        if target <= self.E:
            return None
        return TOKEN_UNIT * (self.B / (target - self.E)) ** (1.0 / self.beta)


def fit_power_law(tokens: np.ndarray, losses: np.ndarray) -> Fit:
    """Least-squares fit of L(D) = E + B·D^(−β) (scipy's curve_fit, bounded: E ≥ 0, B > 0, 0 < β ≤ 3)."""
    from scipy.optimize import curve_fit

    d = np.asarray(tokens, dtype=float) / TOKEN_UNIT
    y = np.asarray(losses, dtype=float)
    keep = d > 0
    d, y = d[keep], y[keep]
    if len(d) < 4:
        raise ValueError(f"{len(d)} evaluation points: a 3-parameter fit needs at least 4 "
                         "(evaluate more often)")

    def model(x, E, B, beta):
        return E + B * x ** (-beta)

    best = None
    for beta0 in (0.1, 0.3, 0.6, 1.0):  # a few starts: the fit has flat directions on short curves
        try:
            p, _ = curve_fit(model, d, y,
                             p0=(max(0.0, y.min() * 0.8), max(1e-6, (y.max() - y.min()) + 0.1), beta0),
                             bounds=([0.0, 1e-9, 1e-3], [np.inf, np.inf, 3.0]), maxfev=20000)
        except RuntimeError:
            continue
        err = float(np.sum((model(d, *p) - y) ** 2))
        if best is None or err < best[0]:
            best = (err, p)
    if best is None:
        raise ValueError("the power-law fit did not converge")
    E, B, beta = best[1]
    return Fit(float(E), float(B), float(beta), len(d))


def extrapolate(tokens: np.ndarray, losses: np.ndarray, target: float, samples: int = 200,
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
            d = fit_power_law(tokens, y).tokens_to_reach(target)
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


# ----------------------------------------------------------------------------------------------------------


def read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    shares = [r["teacher_token_share"] for r in records if r.get("teacher_token_share") is not None]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"name": run_dir.name, "dir": str(run_dir), "summary": summary,
            "train": [r for r in records if "loss" in r], "eval": [r for r in records if "eval_loss" in r],
            # What a stream run really trained on (every step has the same number of tokens: a plain mean).
            "teacher_token_share": sum(shares) / len(shares) if shares else None}


def run_label(run: dict) -> str:
    """A run's name, with the share of its tokens a teacher wrote when it trained from a feed."""
    share = run["teacher_token_share"]
    return run["name"] if share is None else f"{run['name']} (teacher {share:.1%} of tokens)"


def _plot(runs: list[dict], reference: tuple[str, float] | None, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    data: dict = {}
    for run in runs:
        tr, ev = run["train"], run["eval"]
        data[run["name"]] = {"train": {"step": [r["step"] for r in tr], "tokens": [r["tokens"] for r in tr],
                                       "loss": [r["loss"] for r in tr]},
                             "eval": {"step": [r["step"] for r in ev], "tokens": [r["tokens"] for r in ev],
                                      "loss": [r["eval_loss"] for r in ev]}}
        d = data[run["name"]]
        label = run_label(run)
        axes[0][0].plot(d["train"]["step"], d["train"]["loss"], label=label, alpha=0.8)
        axes[0][1].plot(d["train"]["tokens"], d["train"]["loss"], label=label, alpha=0.8)
        axes[1][0].plot(d["eval"]["step"], d["eval"]["loss"], "o-", label=label)
        axes[1][1].plot(d["eval"]["tokens"], d["eval"]["loss"], "o-", label=label)
        # a mix of corpora: each one, dotted
        for source in ev[0].get("eval_loss_by_source", {}) if ev else ():
            losses = [r["eval_loss_by_source"][source] for r in ev]
            d["eval"][f"loss[{source}]"] = losses
            for j, x in enumerate(("step", "tokens")):
                axes[1][j].plot(d["eval"][x], losses, ".:", label=f"{run['name']}: {source}", alpha=0.8)
    for ax in axes[1]:
        if reference:
            ax.axhline(reference[1], color="k", ls="--", lw=1, label=reference[0])
    titles = [["training loss vs steps", "training loss vs tokens"], ["evaluation loss vs steps",
                                                                      "evaluation loss vs tokens"]]
    for i in range(2):
        for j in range(2):
            axes[i][j].set_title(titles[i][j])
            axes[i][j].set_xlabel("tokens" if j else "step")
            axes[i][j].set_ylabel("loss (nats/token)")
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    (out / "loss_curves.json").write_text(json.dumps(data))
    return data


def _plot_extrapolation(runs: list[dict], fits: dict, reference: tuple[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        ev = run["eval"]
        x = np.array([r["tokens"] for r in ev if r["tokens"] > 0], dtype=float)
        y = np.array([r["eval_loss"] for r in ev if r["tokens"] > 0])
        ax.plot(x, y, "o", label=f"{run['name']} (evaluation)")
        f = fits.get(run["name"])
        if f and "fit" in f:
            fit = Fit(**f["fit"])
            end = max(x.max() * 10, f["tokens"] or 0) * 1.5
            xs = np.logspace(np.log10(x.min()), np.log10(end), 200)
            ax.plot(xs, fit.loss(xs), "-", label=f"{run['name']} fit E={fit.E:.2f}, β={fit.beta:.2f}")
    ax.axhline(reference[1], color="k", ls="--", lw=1, label=reference[0])
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("evaluation loss (nats/token)")
    ax.set_title("L(D) = E + B·D^(−β), extrapolated")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "extrapolation.png", dpi=110)
    plt.close(fig)


def _fmt_tokens(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def build_report(run_dirs: list[Path], out: Path, reference: tuple[str, float] | None = None,
                 extra_eval: dict[str, float] | None = None) -> dict:
    """Write report.md, report.json and the PNG plots (with their data as JSON) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(Path(d)) for d in run_dirs]
    _plot(runs, reference, out)
    rows, fits = [], {}
    for run in runs:
        s, ev = run["summary"], run["eval"]
        final = s.get("final_eval_loss", ev[-1]["eval_loss"] if ev else None)
        row = {"run": run["name"], "initial_loss": s.get("initial_eval_loss"),
               "target_loss": s.get("target_loss"),
               "target_reached": s.get("target_reached"), "final_eval_loss": final, "steps": s.get("steps"),
               "tokens": s.get("tokens"), "tokens_per_s": s.get("tokens_per_s"), "wall_s": s.get("elapsed_s"),
               "teacher_token_share": run["teacher_token_share"]}
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
    if reference and any("fit" in f for f in fits.values()):
        _plot_extrapolation(runs, fits, reference, out)
    report = {"runs": rows, "reference": {"name": reference[0], "loss": reference[1]} if reference else None,
              "extrapolation": fits, "phi2_budget": PHI2_BUDGET}
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
        lines.append(f"| {r['run']} | {r['initial_loss']:.3f} | {reached} | {r['final_eval_loss']:.3f} |"
                     + (f" {r['final_loss_on_eval_data']:.3f} |" if extra else "")
                     + f" {_fmt_tokens(r['tokens'])} |"
                     + ((f" {share:.1%} |" if share is not None else " — |") if shares else "")
                     + f" {r['tokens_per_s'] or 0:,.0f} | {r['wall_s'] or 0:.0f} s |")
    if ref:
        lines += ["", f"## Against {ref['name']}: {ref['loss']:.3f} nats/token", ""]
        for r in report["runs"]:
            f = report["extrapolation"].get(r["run"], {})
            gap = r.get("gap_to_reference")
            lines.append(f"**{r['run']}**: final loss {gap:+.3f} nats/token from the reference."
                         if gap is not None else f"**{r['run']}**: no final loss.")
            if "error" in f:
                lines.append(f"No extrapolation: {f['error']}.")
            elif not f.get("reachable"):
                fit = f["fit"]
                lines.append(f"The fit L(D) = {fit['E']:.3f} + {fit['B']:.3g}·(D/1M)^(−{fit['beta']:.3f}) "
                             "levels off "
                             f"at E = {fit['E']:.3f}, above the reference: **at this model size and on this "
                             "data the reference is out of reach**, however long it trains.")
            else:
                fit = f["fit"]
                interval = f.get("tokens_90pct_interval")
                unc = (f" (90% bootstrap interval {_fmt_tokens(interval[0])}–{_fmt_tokens(interval[1])}; "
                       f"{f['bootstrap_unreachable_share']:.0%} of resamples never reach it)"
                       if interval else "")
                hours = f.get("device_hours")
                lines.append(f"The fit L(D) = {fit['E']:.3f} + {fit['B']:.3g}·(D/1M)^(−{fit['beta']:.3f}) "
                             "reaches "
                             f"the reference after **{_fmt_tokens(f['tokens'])} tokens**{unc}: "
                             f"{_fmt_tokens(f.get('more_tokens'))} more"
                             + (f", about **{hours:,.0f} device-hours** at this run's "
                                f"{r['tokens_per_s']:,.0f} tokens/s." if hours is not None else "."))
            lines.append("")
        b = report["phi2_budget"]
        lines += [f"For scale, Phi-2 itself: {_fmt_tokens(b['tokens'])} tokens on {b['gpus']} × {b['gpu']} "
                  "for "
                  f"{b['days']} days ({b['gpu_hours']:,} GPU-hours).", ""]
        if any("fit" in f for f in report["extrapolation"].values()):
            lines += ["![extrapolation](extrapolation.png)", "",
                      "A fit of a short curve says little about a long one: read the interval, not the "
                      "point."]
    return "\n".join(lines) + "\n"


class ReportConfig(ConfigBase):
    """Plots, tables and "how much more training" for one or more runs, against a reference."""

    positional: ClassVar[tuple[str, ...]] = ("runs",)
    runs: list[str]
    """Run folders (with metrics.jsonl and summary.json)."""
    out: str
    """Folder for report.md, report.json and the plots."""
    reference_loss: float | None = None
    """Reference loss in nats/token (Phi-2 on WikiText-2: 2.273)."""
    reference_name: str | None = None
    """Label of the reference."""
    reference_model: str | None = None
    """Measure the reference instead: a model folder or hub id (e.g. microsoft/phi-2); needs --eval-data."""
    eval_data: str | None = None
    """Text on which the reference model and every run's final model are evaluated."""
    block_size: int = 2048
    """Window length of the --reference-model evaluation."""
    max_eval_tokens: int | None = None
    """Cap on evaluated tokens."""


def _measured_reference(cfg: ReportConfig) -> tuple[tuple[str, float], dict[str, float]]:
    """The reference model's loss on --eval-data, and each run's final model's on the same text."""
    from .devices import pick_device
    from .evaluation import evaluate_model, whole_documents
    from .tokenizer import load_tokenizer

    if not cfg.eval_data:
        raise ConfigError("--reference-model needs --eval-data: the text both are measured on")
    device, tokenizer, texts = pick_device(), load_tokenizer(), whole_documents(cfg.eval_data)

    def loss_of(model: str) -> float:
        return evaluate_model(model, texts, tokenizer, cfg.block_size, device,
                              max_tokens=cfg.max_eval_tokens).loss

    reference = (cfg.reference_name or cfg.reference_model, loss_of(cfg.reference_model))
    return reference, {Path(d).name: loss_of(str(Path(d) / "final")) for d in cfg.runs}


def run_report(cfg: ReportConfig) -> None:
    reference, extra = None, None
    if cfg.reference_model:
        reference, extra = _measured_reference(cfg)
    elif cfg.reference_loss is not None:
        reference = (cfg.reference_name or "reference", cfg.reference_loss)
    report = build_report([Path(d) for d in cfg.runs], Path(cfg.out), reference, extra)
    print(f"wrote {Path(cfg.out) / 'report.md'} ({len(report['runs'])} runs)")
