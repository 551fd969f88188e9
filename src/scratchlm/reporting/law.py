"""How much more training: loss curves fitted against their learning-rate schedule, backtested, extrapolated.

The loss model is the scaling law with learning-rate annealing (Tissue et al. 2024, "Scaling Law with
Learning Rate Annealing"): after s steps,

    L(s) = L0 + A·S1^(−α) − C·S2

where S1 = Σ η_i is the summed learning rate (the forward area) and S2 = Σ m_i the annealing area, with
m_i = λ·m_(i−1) + max(0, η_(i−1) − η_i): a fall of the rate lowers the loss, with a delay set by λ. A rise
(warmup) anneals nothing. Both areas are counted in steps at the peak rate, so A and C read in steps.

Why this and not L(D) = E + B·D^(−β) on tokens alone: a run whose rate decays to its own end bends for a
reason that has nothing to do with data, and a power law reads that bend as a floor. The annealing law
separates the two, so a curve of one length and schedule predicts a run of any other. The power law stays as
the baseline, and every prediction comes with backtests: parts of the curves held back and predicted from
the rest, for both models.

It is fitted in an equivalent form that stays well-conditioned on short runs (``LossLaw``). Across model
sizes the level depends on the parameter count through a term K·(N/1M)^(−γ), fitted jointly with the rest
over every run (γ is held at Hoffmann et al. 2022's 0.34 when only two sizes are given).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

TOKEN_UNIT = 1e6  # the power law works in millions of tokens, keeping B and D of similar magnitude
PARAM_UNIT = 1e6
# λ: Tissue et al. found 0.999 on runs of tens of thousands of steps; on runs of a few hundred, decays
# branched off one constant-rate run at four points were fitted best at 0.95 (bench/RESULTS.md). When two
# runs or more decay, the fit chooses λ itself from this grid.
MOMENTUM = 0.95
MOMENTUM_GRID = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
SKIP_WARMUPS = 3  # the first collapse of the loss lasted until 2-3 warmups in our runs (bench/RESULTS.md)
CHINCHILLA_GAMMA = 0.34  # the parameter exponent of Hoffmann et al. 2022, used when two sizes cannot fit it
Z90 = 1.645  # a two-sided 90% interval of a normal error
EXACT_STEPS = 200_000  # longer schedules are integrated on a grid rather than step by step


# --------------------------------------------------------------------------------------------- the areas


def annealed(rates: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Whether, at each of ``steps``, the rate has yet fallen by 1% of its highest value: less than that (a
    cosine over a horizon far past the run) teaches a fit nothing about decays."""
    rates = np.asarray(rates, dtype=float)
    fallen = np.concatenate([[0.0], np.cumsum(np.maximum(0.0, -np.diff(rates, prepend=rates[:1])))])
    return fallen[steps] >= 0.01 * max(float(rates.max(initial=0.0)), 1e-30)


def schedule_areas(rates: np.ndarray, momentum: float = MOMENTUM) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after 0, 1, …, len(rates) steps (index s: after s steps), in units of the given rates."""
    from scipy.signal import lfilter

    rates = np.asarray(rates, dtype=float)
    falls = np.maximum(0.0, -np.diff(rates, prepend=rates[:1]))
    m = lfilter([1.0], [1.0, -momentum], falls)
    return np.concatenate([[0.0], np.cumsum(rates)]), np.concatenate([[0.0], np.cumsum(m)])


def final_areas(rate_of: Callable[[np.ndarray], np.ndarray], steps: int,
                momentum: float = MOMENTUM) -> tuple[float, float]:
    """S1 and S2 at the end of a run of ``steps`` steps whose rate at step i is ``rate_of(i)``. A run too long
    to walk step by step (Phi-2's 1.4T tokens) is integrated on a grid, with
    S2 = Σ_i fall_i·(1 − λ^(T−i))/(1 − λ)."""
    if steps <= EXACT_STEPS:
        s1, s2 = schedule_areas(rate_of(np.arange(steps)), momentum)
        return float(s1[-1]), float(s2[-1])
    grid = np.unique(np.linspace(0, steps - 1, EXACT_STEPS).round())
    rates = rate_of(grid)
    s1 = float(np.sum(0.5 * (rates[1:] + rates[:-1]) * np.diff(grid)) + rates[0])
    falls = np.maximum(0.0, -np.diff(rates))
    since = steps - grid[1:]
    s2 = float(np.sum(falls * (1.0 - momentum ** since) / (1.0 - momentum)))
    return s1, s2


# -------------------------------------------------------------------------------------------- the curves


@dataclass
class Curve:
    """What a fit sees of one run: its evaluation losses and the rate of every step before them."""

    name: str
    steps: np.ndarray
    """Steps of the evaluations (after that many optimizer steps; step 0 is left out)."""
    tokens: np.ndarray
    losses: np.ndarray
    rates: np.ndarray
    """The rate of steps 1 … last (as logged)."""
    parameters: int | None = None

    @property
    def warmup_steps(self) -> int:
        """Steps until the rate first reaches its peak."""
        return int(np.argmax(self.rates >= 0.999 * self.rates.max())) + 1 if len(self.rates) else 0

    @property
    def tokens_per_step(self) -> float:
        return float(self.tokens[-1] / self.steps[-1])

    def fit_points(self) -> Curve:
        """The evaluations a fit uses: from three warmups on (before, the loss is still in its first
        collapse, which the law does not describe)."""
        return self.part(self.steps >= SKIP_WARMUPS * self.warmup_steps)

    def part(self, keep: np.ndarray) -> Curve:
        """The same run, only the evaluations where ``keep`` is true."""
        return Curve(self.name, self.steps[keep], self.tokens[keep], self.losses[keep], self.rates,
                     self.parameters)


# ------------------------------------------------------------------------------------------------ fitting


def _forward(s1: np.ndarray, alpha: float) -> np.ndarray:
    """g = (1 − S1^(−α))/α, and its limit ln S1 at α = 0 (a series near it: no 0/0)."""
    u = np.log(np.maximum(s1, 1e-12))
    if alpha < 1e-4:
        return u - alpha * u**2 / 2 + alpha**2 * u**3 / 6
    return -np.expm1(-alpha * u) / alpha


def _forward_slope(s1: np.ndarray, alpha: float) -> np.ndarray:
    """∂g/∂α = (S1^(−α)·ln S1 − g)/α, and its series −(ln S1)²/2 + α(ln S1)³/3 near α = 0."""
    u = np.log(np.maximum(s1, 1e-12))
    if alpha < 1e-4:
        return -(u**2) / 2 + alpha * u**3 / 3
    return (np.exp(-alpha * u) * u - _forward(s1, alpha)) / alpha


def _law_jacobian(p: np.ndarray, names: list[str], fixed: dict, s1: np.ndarray, s2: np.ndarray,
                  parameters: np.ndarray) -> np.ndarray:
    """∂L/∂p for each fitted parameter (columns in ``names``' order): the fit needs no finite differences,
    which stall where α meets its bound at 0."""
    v = {**fixed, **dict(zip(names, p, strict=True))}
    size = (parameters / PARAM_UNIT) ** (-v["gamma"])
    columns = {"L1": np.ones_like(s1), "B": -_forward(s1, v["alpha"]),
               "alpha": -v["B"] * _forward_slope(s1, v["alpha"]), "C": -s2, "K": size,
               "gamma": -v["K"] * size * np.log(parameters / PARAM_UNIT)}
    return np.stack([columns[name] for name in names], axis=1)


@dataclass
class LossLaw:
    """L = L1 + K·(N/1M)^(−γ) − B·(1 − S1^(−α))/α − C·S2, and the fit's covariance.

    The published L0 + A·S1^(−α) − C·S2 written from its value at S1 = 1 (L1 = L0 + A) and its slope there
    (B = A·α): the same curves, and at α → 0 their limit L1 − B·ln S1, a loss still falling by the same
    amount per doubling of the run, which is what short runs show. In the published form that limit sits at
    L0 → −∞, A → ∞ and a fit stalls at a bound; here it is α = 0, with no floor measured yet."""

    L1: float
    B: float
    alpha: float
    C: float
    K: float = 0.0
    gamma: float = CHINCHILLA_GAMMA
    rate_unit: float = 1.0
    """The rate that counts as one step of area (the highest rate among the fitted runs)."""
    momentum: float = MOMENTUM
    momentum_source: str = "default"
    """How λ was set: 'given', 'fitted' (several runs decay) or 'default'."""
    names: list[str] = field(default_factory=lambda: ["L1", "B", "alpha", "C"])
    """The parameters the fit moved (the others were held)."""
    covariance: list[list[float]] | None = None
    residual_rms: float = 0.0
    points: int = 0
    annealing_seen: bool = True
    """False when no fitted curve had a falling rate: C was held at 0 and predictions hold no decay's gain."""
    floor_bound: float | None = None
    """The bound L0 was fitted above (the published form, ``fit_loss_law(floor_at_least=…)``); None: the
    fitted form, where α = 0 is the limit of no floor."""

    @property
    def floor(self) -> float | None:
        """L0, the loss the curve levels off at for the fitted model size (None: no levelling off seen, or
        the fit left L0 at its bound: not a measured floor)."""
        if self.alpha <= 1e-3:
            return None
        floor = self.L1 - self.B / self.alpha
        return None if self.floor_bound is not None and floor - self.floor_bound < 1e-3 else floor

    def floor_at(self, parameters: float) -> float | None:
        """The lowest loss a model of ``parameters`` reaches at any length and schedule: L0, its size's term,
        and the most a decay can give (a fall of the whole rate: S2 → 1/(1 − λ)). None: no floor seen."""
        if self.floor is None:
            return None
        size = self.K * (parameters / PARAM_UNIT) ** (-self.gamma)
        return self.floor + size - self.C / (1.0 - self.momentum)

    def parameters_to_reach(self, loss: float) -> float | None:
        """The smallest size whose floor lies below ``loss``; None when none does (or no floor is seen)."""
        if self.floor is None or self.K == 0.0:
            return None
        room = loss - (self.floor - self.C / (1.0 - self.momentum))
        return PARAM_UNIT * (self.K / room) ** (1.0 / self.gamma) if room > 0 else None

    def loss(self, s1: np.ndarray | float, s2: np.ndarray | float, parameters: float | None = None):
        return _law(self.vector(), self.names, self._fixed(), np.asarray(s1), np.asarray(s2),
                    np.asarray(parameters or PARAM_UNIT, dtype=float))

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in self.names])

    def _fixed(self) -> dict:
        return {n: getattr(self, n) for n in ("L1", "B", "alpha", "C", "K", "gamma") if n not in self.names}

    def areas(self, rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return schedule_areas(np.asarray(rates) / self.rate_unit, self.momentum)

    def predict(self, s1: float, s2: float, parameters: float | None = None) -> tuple[float, list[float]]:
        """The loss at areas (S1, S2), and a 90% interval from the fit's covariance (the delta method)."""
        x = (np.array([s1]), np.array([s2]), np.array([parameters or PARAM_UNIT], dtype=float))
        p, fixed = self.vector(), self._fixed()
        value = float(_law(p, self.names, fixed, *x)[0])
        if self.covariance is None:
            return value, [value, value]
        grad = np.zeros(len(p))
        for i in range(len(p)):
            h = 1e-6 * max(1.0, abs(p[i]))
            up, down = p.copy(), p.copy()
            up[i] += h
            down[i] = max(0.0, down[i] - h) if self.names[i] == "alpha" else down[i] - h
            rise = _law(up, self.names, fixed, *x)[0] - _law(down, self.names, fixed, *x)[0]
            grad[i] = rise / (up[i] - down[i])
        spread = Z90 * math.sqrt(max(0.0, float(grad @ np.asarray(self.covariance) @ grad)))
        return value, [value - spread, value + spread]

    def to_dict(self) -> dict:
        return {**asdict(self), "L0": self.floor}

    @classmethod
    def from_dict(cls, saved: dict) -> LossLaw:
        return cls(**{k: v for k, v in saved.items() if k != "L0"})


def _law(p: np.ndarray, names: list[str], fixed: dict, s1: np.ndarray, s2: np.ndarray,
         parameters: np.ndarray) -> np.ndarray:
    v = {**fixed, **dict(zip(names, p, strict=True))}
    size = v["K"] * (parameters / PARAM_UNIT) ** (-v["gamma"])
    return v["L1"] + size - v["B"] * _forward(s1, v["alpha"]) - v["C"] * s2


def fit_loss_law(curves: Sequence[Curve], momentum: float | None = None,
                 floor_at_least: float | None = None) -> LossLaw:
    """Least-squares fit of the law to the evaluations of ``curves`` a fit uses (``Curve.fit_points``); with
    runs of several model sizes the dependence on N is fitted too (γ only from three sizes up). λ:
    ``momentum`` if given; else chosen by the residual when two runs or more decay (their decays tell how
    long a fall of the rate keeps paying), among the λ of ``MOMENTUM_GRID`` whose memory 1/(1 − λ) the
    longest decay fitted is long enough to show; else ``MOMENTUM``.

    ``floor_at_least``: fit the published form L0 + A·S1^(−α) instead, with L0 held at or above this (a
    cross-entropy is not below zero): the form for extrapolating far (a ladder to Phi-2), where a curve
    that falls by the same amount per doubling forever would cross zero. A floor the fit leaves at that
    bound is not a measured one (``LossLaw.floor`` is None)."""
    if momentum is not None:
        return _fit_at(curves, momentum, "given", floor_at_least)
    if sum(bool(annealed(c.rates, c.steps).any()) for c in curves) < 2:
        return _fit_at(curves, MOMENTUM, "default", floor_at_least)
    longest = max(_decay_steps(c) for c in curves)
    grid = [value for value in MOMENTUM_GRID if 1.0 / (1.0 - value) <= longest] or [min(MOMENTUM_GRID)]
    fits = []
    for value in grid:
        with contextlib.suppress(ValueError):
            fits.append(_fit_at(curves, value, "fitted", floor_at_least))
    if not fits:
        raise ValueError("the loss-law fit did not converge")
    return min(fits, key=lambda f: f.residual_rms)


def _decay_steps(curve: Curve) -> int:
    """Steps of falling rate a curve's fitted evaluations have seen."""
    seen = curve.rates[: int(curve.steps[-1])] if len(curve.steps) else curve.rates[:0]
    return int(np.sum(np.diff(seen) < 0))


def _published(q: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The published form's parameters (L0, A, α, …, in ``names``' places of L1, B, α) as the fitted form's
    (L1 = L0 + A, B = A·α), and the derivative of that map."""
    p, m = q.copy(), np.eye(len(q))
    i1, ib, ia = names.index("L1"), names.index("B"), names.index("alpha")
    p[i1], p[ib] = q[i1] + q[ib], q[ib] * q[ia]
    m[i1, ib], m[ib, ib], m[ib, ia] = 1.0, q[ia], q[ib]
    return p, m


def _fit_data(curves: Sequence[Curve], momentum: float):
    """The fitted points of every curve: S1, S2, N, losses; the rate unit; whether any decays."""
    unit = max(float(np.max(c.rates)) for c in curves if len(c.rates))
    s1, s2, n, y, seen = [], [], [], [], False
    for c in curves:
        c = c.fit_points()
        seen = seen or bool(annealed(c.rates, c.steps).any())
        a1, a2 = schedule_areas(c.rates / unit, momentum)
        s1.append(a1[c.steps])
        s2.append(a2[c.steps])
        n.append(np.full(len(c.steps), float(c.parameters or PARAM_UNIT)))
        y.append(c.losses)
    return (*map(np.concatenate, (s1, s2, n, y)), unit, seen)


def _fit_at(curves: Sequence[Curve], momentum: float, source: str,
            floor_at_least: float | None = None) -> LossLaw:
    from scipy.optimize import curve_fit

    s1, s2, n, y, unit, seen = _fit_data(curves, momentum)
    sizes = len(set(n.tolist()))
    names = ["L1", "B", "alpha"] + (["C"] if seen else []) + (["K"] if sizes > 1 else []) \
        + (["gamma"] if sizes > 2 else [])
    fixed = {k: v for k, v in (("C", 0.0), ("K", 0.0), ("gamma", CHINCHILLA_GAMMA)) if k not in names}
    if len(y) <= len(names):
        raise ValueError(f"{len(y)} evaluation points for {len(names)} parameters: evaluate more often")
    floored = floor_at_least is not None

    def to_law(q):
        return _published(np.asarray(q), names) if floored else (np.asarray(q), np.eye(len(q)))

    def model(x, *q):
        return _law(to_law(q)[0], names, fixed, x[0], x[1], x[2])

    def jacobian(x, *q):
        p, m = to_law(q)
        return _law_jacobian(p, names, fixed, x[0], x[1], x[2]) @ m

    slope = max(1e-3, float(y.max() - y.min()) / max(1e-3, float(np.log(s1.max() / s1.min()))))
    # α ≤ 1: published fits of language-model curves sit near 0.3-0.6; a few noisy points must not bend a
    # curve into a wall. In the published form α > 0: at 0 its curve is flat.
    lower = {"L1": floor_at_least if floored else -np.inf, "B": 0.0, "alpha": 0.01 if floored else 0.0,
             "C": 0.0, "K": 0.0, "gamma": 0.05}
    upper = {"L1": np.inf, "B": np.inf, "alpha": 1.0, "C": np.inf, "K": np.inf, "gamma": 1.5}
    best = None
    for alpha0 in (0.01, 0.2, 0.6):  # a few starts: the fit has flat directions on short curves
        start = {"L1": float(y.max()) + slope * float(np.log(s1.min())), "B": slope, "alpha": alpha0,
                 "C": 0.01 * slope, "K": slope, "gamma": CHINCHILLA_GAMMA}
        if floored:
            start.update(L1=floor_at_least, B=float(y.max()) - floor_at_least, alpha=max(alpha0, 0.05))
        try:
            q, cov = curve_fit(model, (s1, s2, n), y, p0=[start[k] for k in names], jac=jacobian,
                               bounds=([lower[k] for k in names], [upper[k] for k in names]), maxfev=3000)
        except (RuntimeError, ValueError):
            continue
        err = float(np.sum((model((s1, s2, n), *q) - y) ** 2))
        if best is None or err < best[0]:
            best = (err, q, cov)
    if best is None:
        raise ValueError("the loss-law fit did not converge")
    err, q, cov = best
    p, m = to_law(q)
    cov = m @ cov @ m.T
    values = {**fixed, **dict(zip(names, (float(v) for v in p), strict=True))}
    return LossLaw(**values, rate_unit=unit, momentum=momentum, momentum_source=source, names=names,
                   covariance=cov.tolist() if np.all(np.isfinite(cov)) else None,
                   residual_rms=math.sqrt(err / len(y)), points=len(y), annealing_seen=seen,
                   floor_bound=floor_at_least)


# ----------------------------------------------------------------------------------------------- prediction


def predict_end(law: LossLaw, rate_of: Callable[[np.ndarray], np.ndarray], steps: int,
                parameters: float | None = None, lowest: float = 0.0) -> tuple[float, list[float]]:
    """The loss at the end of a run of ``steps`` steps with rates ``rate_of``, and its 90% interval; never
    below ``lowest`` (a cross-entropy is not below zero, nor below a floor measured for the size: a law
    extrapolated past where it was fitted can say otherwise, and is not believed there)."""
    s1, s2 = final_areas(lambda i: rate_of(i) / law.rate_unit, steps, law.momentum)
    value, interval = law.predict(s1, s2, parameters)
    lowest = max(0.0, lowest)
    return max(value, lowest), [max(v, lowest) for v in interval]


def steps_to_reach(law: LossLaw, schedule: Callable[[int], Callable[[np.ndarray], np.ndarray]], target: float,
                   parameters: float | None = None, start: int = 1, limit: int = 10**13,
                   bound: int | None = None, lowest: float = 0.0) -> int | None:
    """The shortest run (in steps, each length with its own schedule ``schedule(steps)``) whose final loss
    reaches ``target``; None when even ``limit`` steps do not, or ``target`` lies below ``lowest`` (zero, or
    a floor measured for the size). ``bound`` 0 or 1: the same for the lower or upper end of the 90%
    interval."""
    if target < max(0.0, lowest):
        return None

    def reaches(steps: int) -> bool:
        value, interval = predict_end(law, schedule(steps), steps, parameters)
        return (value if bound is None else interval[bound]) <= target

    if not reaches(limit):
        return None
    lo, hi = start, start
    while not reaches(hi):
        lo, hi = hi, min(limit, hi * 4)
    while hi - lo > max(1, lo // 1000):  # to 0.1%: closer than the fit can tell
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi
