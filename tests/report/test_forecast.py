"""The loss law against the learning-rate schedule: its areas, its fit on curves of known parameters, and the
forecast on real runs (a short and a long run; a decay predicted from a constant-rate run)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scratchlm.model.config import get_preset
from scratchlm.reporting.backtest import backtest_end, backtest_runs
from scratchlm.reporting.command import ReportConfig, ReportRequest, build_report, run_report
from scratchlm.reporting.forecast import forecast
from scratchlm.reporting.ladder import fit_ladder
from scratchlm.reporting.law import Curve, LossLaw, final_areas, fit_loss_law, predict_end, schedule_areas
from scratchlm.reporting.runs import EvalRecord, Run, TrainRecord
from scratchlm.training import TrainConfig, train
from scratchlm.training.optim import schedule_for


def test_areas_by_hand():
    s1, s2 = schedule_areas(np.array([1.0, 1.0, 0.5, 0.5, 0.25]), momentum=0.5)
    assert s1.tolist() == [0.0, 1.0, 2.0, 2.5, 3.0, 3.25]
    # falls 0, 0, .5, 0, .25; m = .5·m + fall: 0, 0, .5, .25, .375; S2 = running sum
    assert s2 == pytest.approx([0.0, 0.0, 0.0, 0.5, 0.75, 1.125])
    _, rising = schedule_areas(np.array([0.1, 0.5, 1.0]))  # a warmup anneals nothing
    assert rising.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_long_runs_are_integrated_on_a_grid_to_the_same_areas():
    cfg = TrainConfig(lr=1.0, min_lr=0.01, warmup_steps=100, lr_schedule="wsd")
    steps = 600_000  # above the exact limit: integrated on a grid
    exact = schedule_areas(schedule_for(cfg, steps).rates(steps))
    grid = final_areas(schedule_for(cfg, steps).at, steps)
    assert grid[0] == pytest.approx(exact[0][-1], rel=1e-4)
    assert grid[1] == pytest.approx(exact[1][-1], rel=1e-3)


def synthetic(law: LossLaw, name: str, cfg: TrainConfig, steps: int, noise: float, seed: int) -> Curve:
    rates = schedule_for(cfg, steps).rates(steps)
    s1, s2 = law.areas(rates)
    at = np.arange(10, steps + 1, 10)
    rng = np.random.default_rng(seed)
    losses = law.loss(s1[at], s2[at]) + rng.normal(0, noise, len(at))
    return Curve(name, at, at * 2048.0, losses, rates)


WSD = TrainConfig(lr=3e-3, min_lr=6e-5, warmup_steps=10, lr_schedule="wsd")
COSINE = WSD.model_copy(update={"lr_schedule": "cosine"})


@pytest.mark.parametrize("truth", [LossLaw(L1=9.5, B=0.8, alpha=0.2, C=0.004, rate_unit=3e-3),
                                   LossLaw(L1=8.0, B=0.6, alpha=0.0, C=0.01, rate_unit=3e-3),
                                   LossLaw(L1=7.0, B=1.2, alpha=0.5, C=0.006, rate_unit=3e-3)])
def test_fit_recovers_known_parameters_and_predicts_another_schedule(truth):
    curves = [synthetic(truth, "wsd", WSD, 400, 0.003, 1), synthetic(truth, "cosine", COSINE, 300, 0.003, 2)]
    law = fit_loss_law(curves)
    assert law.annealing_seen and law.names == ["L1", "B", "alpha", "C"]
    assert law.momentum_source == "fitted" and law.momentum == truth.momentum  # two runs decay: λ chosen
    assert law.L1 == pytest.approx(truth.L1, abs=0.15)
    assert law.B == pytest.approx(truth.B, rel=0.15)
    assert law.alpha == pytest.approx(truth.alpha, abs=0.05)
    assert law.C == pytest.approx(truth.C, rel=0.25)
    # a run 3x longer than any fitted, with the other schedule: the law's answer and its 90% interval
    schedule = schedule_for(WSD, 1200)
    s1, s2 = truth.areas(schedule.rates(1200))
    predicted, (lo, hi) = predict_end(law, schedule.at, 1200)
    assert predicted == pytest.approx(float(truth.loss(s1[-1], s2[-1])), rel=0.01)
    assert lo < predicted < hi and hi - lo < 0.5


def test_a_curve_without_decay_holds_the_annealing_term_at_zero():
    truth = LossLaw(L1=9.0, B=0.7, alpha=0.1, C=0.01, rate_unit=3e-3)
    flat = synthetic(truth, "constant", WSD.model_copy(update={"lr_schedule": "constant"}), 300, 0.003, 3)
    law = fit_loss_law([flat])
    assert not law.annealing_seen and law.C == 0.0 and "C" not in law.names


def test_backtests_hold_back_the_end_and_whole_runs():
    truth = LossLaw(L1=9.5, B=0.8, alpha=0.2, C=0.004, rate_unit=3e-3)
    short, long = synthetic(truth, "short", WSD, 100, 0.002, 4), synthetic(truth, "long", WSD, 400, 0.002, 5)
    end = backtest_end(long)
    # the long run's decay lies in its held-back part: the points before it are split instead
    assert end["held_back"] == "evaluations after step 200 up to step 320 (before the decay)"
    assert end["step"] == 320 and abs(end["error"]) < 0.01
    whole = backtest_runs([short, long])
    assert whole["kind"] == "whole run" and whole["run"] == "long" and abs(whole["error"]) < 0.02
    assert "power_law" in whole and "power_law" in end


def test_sizes_extrapolate_to_a_larger_model():
    truth = LossLaw(L1=6.0, B=0.8, alpha=0.2, C=0.004, K=4.0, gamma=0.3, rate_unit=3e-3)
    curves = []
    for i, n in enumerate((5e6, 15e6, 40e6)):
        c = synthetic(truth, f"n{i}", WSD, 300, 0.002, 10 + i)
        s1, s2 = truth.areas(c.rates)
        c.losses = truth.loss(s1[c.steps], s2[c.steps], n) + np.random.default_rng(i).normal(0, 0.002,
                                                                                             len(c.steps))
        c.parameters = int(n)
        curves.append(c)
    law = fit_loss_law(curves)
    assert "gamma" in law.names and law.gamma == pytest.approx(0.3, abs=0.1)
    s1, s2 = truth.areas(curves[0].rates)
    phi2 = float(truth.loss(s1[-1], s2[-1], 2.78e9))  # Phi-2's size, 70x the largest fitted
    assert law.loss(s1[-1], s2[-1], 2.78e9) == pytest.approx(phi2, rel=0.02)
    held = backtest_runs(curves)
    assert held["kind"] == "largest model" and held["run"] == "n2" and abs(held["error"]) < 0.02


LADDER = ("phi-d48", "phi-d64", "phi-d96", "phi-tiny")


def synthetic_run(truth: LossLaw, model: str, count: str, cfg: TrainConfig, steps: int, seed: int) -> Run:
    """A run of ``model`` whose evaluations follow ``truth`` with N counted ``count``'s way, as ``Run`` reads
    it from its folder (config, training records with the rate, evaluations)."""
    preset = get_preset(model)
    n = preset.num_parameters if count == "total" else preset.num_non_embedding_parameters
    rates = schedule_for(cfg, steps).rates(steps)
    s1, s2 = truth.areas(rates)
    at = np.arange(10, steps + 1, 10)
    losses = truth.loss(s1[at], s2[at], n) + np.random.default_rng(seed).normal(0, 0.003, len(at))
    config = cfg.model_copy(update={"model": model, "max_steps": steps})
    return Run(f"{model}-{steps}", Path(model), config, {},
               [TrainRecord(s, s * 2048, 0.0, lr=float(rates[s - 1])) for s in range(1, steps + 1)],
               [EvalRecord(int(s), int(s) * 2048, float(v)) for s, v in zip(at, losses, strict=True)])


@pytest.mark.parametrize("count", ["non_embedding", "total"])
def test_a_ladder_recovers_how_its_sizes_were_counted(count):
    """Curves of the ladder's four presets from a known L(N, D), N counted one way: the ladder keeps that
    count (its largest size, predicted from the smaller ones, errs less), fits γ, and the answers respect the
    floor: none below it, none below zero."""
    truth = LossLaw(L1=5.0, B=0.8, alpha=0.25, C=0.004, K=2.5, gamma=0.35, rate_unit=3e-3)
    runs = [synthetic_run(truth, m, count, WSD, steps, 20 + i) for i, m in enumerate(LADDER)
            for steps in (100, 200)] + [synthetic_run(truth, LADDER[-1], count, WSD, 800, 30)]
    ladder = fit_ladder(runs, momentum=truth.momentum)  # λ given: the test is about N, not λ
    assert ladder.count == count and ladder.errors[count] < 0.01 < max(ladder.errors.values())
    assert "gamma" in ladder.law.names and ladder.law.gamma == pytest.approx(0.35, abs=0.1)
    tiny = get_preset("phi-tiny")
    n = tiny.num_parameters if count == "total" else tiny.num_non_embedding_parameters
    true_floor = truth.floor_at(n)
    assert ladder.floor(tiny) == pytest.approx(true_floor, abs=0.1)
    reach = [b["reach"] for b in ladder.backtests if b["count"] == count]
    assert max(reach) == pytest.approx(4.0)  # the largest size's 4x run, from the smaller sizes' longest
    # a target under the size's floor is out of reach at that size, and a larger size would reach it
    tiny_runs = [r for r in runs if r.name == "phi-tiny-200"]
    outlook = forecast(tiny_runs, reference=true_floor - 0.5, momentum=truth.momentum, known_ladder=ladder)
    assert outlook["reference"]["out_of_reach"] and outlook["reference"]["tokens"] is None
    assert outlook["reference"]["size_to_reach"] > ladder.size(tiny)
    # a ladder that shows no floor (its curves still log-linear) gives no count at all, not a lower bound
    no_floor = replace(ladder, law=replace(ladder.law, alpha=0.0))
    outlook = forecast(tiny_runs, reference=true_floor - 0.5, momentum=truth.momentum, known_ladder=no_floor)
    assert outlook["reference"]["floor_unmeasured"] and outlook["reference"]["tokens"] is None


# ------------------------------------------------------------------------------------------- real runs

REAL = dict(model="phi-tiny", block_size=64, micro_batch_size=4, eval_batches=2, eval_fraction=0.05,
            warmup_steps=10, lr=3e-3, eval_interval=2, device="cpu", log_interval=50)


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """A constant-rate run of 160 steps and two wsd runs made from it (the README's schedule for this
    question): 50 steps (its decay of 10 branched off step 40) and 200 steps (40 off step 160). A branch is
    the wsd run of its length to the last bit (tests/training/test_train.py checks that); branching saves the
    CPU the shared part."""
    root = tmp_path_factory.mktemp("scaling-runs")
    common = dict(REAL, data=str(small_corpus))
    train(TrainConfig(**common, out=str(root / "constant"), max_steps=160, lr_schedule="constant",
                      checkpoint_interval=40, keep_checkpoints=4))
    for name, step, decay in (("short", 40, 10), ("long", 160, 40)):
        train(TrainConfig(**common, out=str(root / name), lr_schedule="wsd", decay_steps=decay,
                          resume_from=str(root / "constant" / "checkpoints" / f"step-{step:08d}")))
    return root


def final_eval(run) -> float:
    return json.loads((run / "summary.json").read_text())["final_eval_loss"]


@pytest.mark.slow
def test_the_short_run_predicts_the_long_run(runs, capsys):
    """`scratchlm report SHORT --predict-tokens (LONG's tokens) --json`, as a user runs it (in-process: the
    command's own function, without paying for a second interpreter's imports)."""
    tokens = json.loads((runs / "long" / "summary.json").read_text())["tokens"]
    run_report(ReportConfig(runs=[str(runs / "short")], predict_tokens=tokens, json=True))
    answer = json.loads(capsys.readouterr().out)
    actual = final_eval(runs / "long")
    assert answer["tokens"] == tokens and answer["schedule"] == "wsd"
    assert answer["predicted_loss"] == pytest.approx(actual, rel=0.03)
    lo, hi = answer["interval"]
    assert lo < answer["predicted_loss"] < hi
    # it says how far to trust it: the backtest of the run it extends, held-back end predicted from the rest
    assert answer["backtest"]["run"] == "short" and answer["backtest"]["kind"] == "end of run"
    assert answer["backtest_error"] == answer["backtest"]["error"] and abs(answer["backtest_error"]) < 0.2
    assert set(answer["params"]) >= {"L1", "B", "alpha", "C", "L0", "covariance"}
    # any other schedule of the same length, from the same fit
    run_report(ReportConfig(runs=[str(runs / "short")], predict_tokens=tokens, predict_schedule="constant",
                            json=True))
    constant = json.loads(capsys.readouterr().out)
    assert constant["schedule"] == "constant" and constant["params"] == answer["params"]
    assert constant["predicted_loss"] != answer["predicted_loss"]


@pytest.mark.slow
def test_a_decay_is_predicted_from_a_constant_rate_run(runs):
    """Fit on the constant-rate run alone, predict the run that decays off its end: the law counts the rate
    the decay gives up (S1); the constant run shows no decay, so its gain is held at zero, and said so."""
    (outlook,) = build_report(ReportRequest([runs / "constant"]))["forecasts"].values()
    law = LossLaw.from_dict(outlook["params"])
    assert not law.annealing_seen and law.C == 0.0
    decayed = json.loads((runs / "long" / "summary.json").read_text())
    schedule = schedule_for(TrainConfig(**REAL, lr_schedule="wsd", decay_steps=40), 200)
    predicted, _ = predict_end(law, schedule.at, decayed["steps"])
    assert predicted == pytest.approx(decayed["final_eval_loss"], rel=0.03)


@pytest.mark.slow
def test_report_over_three_runs(runs, tmp_path):
    out = tmp_path / "report"
    names = ("short", "long", "constant")
    report = build_report(ReportRequest([runs / n for n in names], out, ("Phi-2", 2.273), predict_tokens=1e6))
    for png in ("loss_curves.png", "forecast.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "loss_curves.json").read_text())
    for name in names:
        metrics = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert data[name]["train"]["loss"] == [m["loss"] for m in metrics if "loss" in m]
        assert data[name]["eval"]["loss"] == [m["eval_loss"] for m in metrics if "eval_loss" in m]
    md = (out / "report.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "Phi-2" in md and "1.4T tokens" in md
    for r in report["runs"]:
        assert r["gap_to_reference"] == pytest.approx(r["final_eval_loss"] - 2.273)
    # one answer per question: the plain power law is only a baseline row of the backtest table
    assert "extrapolation" not in report and "power law says" not in md
    assert "plain power law (baseline)" in md
    (forecast,) = report["forecasts"].values()  # all three trained on the same text: one law over them
    assert forecast["base_run"] == "long" and forecast["params"]["momentum_source"] == "fitted"  # two decay
    kinds = {(b["kind"], b["run"]) for b in forecast["backtests"]}
    assert ("whole run", "long") in kinds and ("end of run", "constant") in kinds
    assert forecast["backtest"]["kind"] == "whole run" and forecast["reference"]["loss"] == 2.273
    assert f"Backtest error {forecast['backtest_error']:+.1%}" in md and "## How much more training" in md
    assert f"ends at {forecast['predicted_loss']:.3f}" in md
