"""The baseline and the checks of the loss law: a plain power law L(D) = E + B·D^(−β) on tokens, and backtests
that hold back part of the curves (the end of a run, or whole runs) and predict it from the rest with both
models, so that every forecast comes with its measured error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .law import TOKEN_UNIT, Curve, annealed, fit_loss_law

# ------------------------------------------------------------------------------------ the power law baseline


@dataclass
class PowerLaw:
    """L(D) = E + B·D^(−β), D in tokens: the baseline, blind to the schedule."""

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


def fit_power_law(tokens: np.ndarray, losses: np.ndarray, start: PowerLaw | None = None) -> PowerLaw:
    """Least-squares fit of L(D) = E + B·D^(−β) (scipy's curve_fit, bounded: E ≥ 0, B > 0, 0 < β ≤ 3), from a
    few starting points, or from ``start`` alone (a bootstrap resample starts from the fit it perturbs)."""
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
    starts = ([(start.E, start.B, start.beta)] if start else
              [(max(0.0, y.min() * 0.8), max(1e-6, (y.max() - y.min()) + 0.1), beta0)
               for beta0 in (0.1, 0.3, 0.6, 1.0)])  # a few starts: flat directions on short curves
    for p0 in starts:
        try:
            p, _ = curve_fit(model, d, y, p0=p0,
                             bounds=([0.0, 1e-9, 1e-3], [np.inf, np.inf, 3.0]), maxfev=3000)
        except RuntimeError:
            continue
        err = float(np.sum((model(d, *p) - y) ** 2))
        if best is None or err < best[0]:
            best = (err, p)
    if best is None:
        raise ValueError("the power-law fit did not converge")
    E, B, beta = best[1]
    return PowerLaw(float(E), float(B), float(beta), len(d))


# ------------------------------------------------------------------------------------------------ backtests


def _relative(predicted: float, actual: float) -> float:
    return (predicted - actual) / actual


def _power_law_at(fitted: Sequence[Curve], tokens: np.ndarray) -> np.ndarray | None:
    try:
        law = fit_power_law(np.concatenate([c.tokens for c in fitted]),
                            np.concatenate([c.losses for c in fitted]))
    except ValueError:
        return None
    return np.asarray(law.loss(tokens))


def _scored(kind: str, held: str, fitted: Sequence[Curve], target: Curve,
            momentum: float | None) -> dict | None:
    """Fit both models on ``fitted``, predict ``target``'s points; errors at its last point (signed, relative)
    and over all of them (mean absolute)."""
    try:
        law = fit_loss_law(fitted, momentum)
    except ValueError:
        return None
    s1, s2 = law.areas(target.rates)
    ours = np.asarray(law.loss(s1[target.steps], s2[target.steps], target.parameters))
    theirs = _power_law_at(fitted, target.tokens) if len({c.parameters for c in fitted}) == 1 else None
    out = {"kind": kind, "held_back": held, "run": target.name, "step": int(target.steps[-1]),
           "actual": float(target.losses[-1]), "predicted": float(ours[-1]),
           "error": _relative(float(ours[-1]), float(target.losses[-1])),
           "mean_abs_error": float(np.mean(np.abs(ours - target.losses) / target.losses))}
    if theirs is not None:
        out["power_law"] = {"predicted": float(theirs[-1]),
                            "error": _relative(float(theirs[-1]), float(target.losses[-1])),
                            "mean_abs_error": float(np.mean(np.abs(theirs - target.losses) / target.losses))}
    return out


def backtest_end(curve: Curve, hold_back: float = 0.4, momentum: float | None = None) -> dict | None:
    """Hold back the last ``hold_back`` of a run's evaluations and predict them from the rest. When the run's
    only decay lies in the held-back part (a wsd run), nothing before it can tell how much a decay gains: the
    points before the decay are split instead, and the backtest checks the forward part of the law."""
    curve = curve.fit_points()  # split what a fit can use
    steps = curve.steps
    decayed = annealed(curve.rates, steps)
    scope = len(steps)
    if decayed.any() and not decayed[: math.ceil(scope * (1 - hold_back))].any():
        scope = int(np.argmax(decayed))
    cut = math.ceil(scope * (1 - hold_back))
    if cut < 4 or cut >= scope:
        return None
    index = np.arange(len(steps))
    held = f"evaluations after step {steps[cut - 1]}" + (f" up to step {steps[scope - 1]} (before the decay)"
                                                         if scope < len(steps) else "")
    target = curve.part((index >= cut) & (index < scope))
    return _scored("end of run", held, [curve.part(index < cut)], target, momentum)


def backtest_runs(curves: Sequence[Curve], momentum: float | None = None) -> dict | None:
    """Given several runs: hold back a whole one and predict it from the others. With one model size, the
    longest run (the question "how much more"); with several sizes, the largest model ("how big")."""
    if len(curves) < 2:
        return None
    sizes = {c.parameters for c in curves}
    if len(sizes) > 1:
        if len(sizes) < 3:
            return None  # two sizes fit E and K with γ held; one size alone cannot tell them apart
        largest = max(sizes, key=lambda n: n or 0)
        target = max((c for c in curves if c.parameters == largest), key=lambda c: c.tokens[-1])
        fitted = [c for c in curves if c.parameters != largest]
        return _scored("largest model", f"the largest model ({largest:,} parameters), from the smaller ones",
                       fitted, target, momentum)
    target = max(curves, key=lambda c: c.tokens[-1])
    return _scored("whole run", "the longest run, from the others", [c for c in curves if c is not target],
                   target, momentum)
