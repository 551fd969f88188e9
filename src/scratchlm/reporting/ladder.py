"""A model-size ladder read as L(N, D): runs of several sizes on one text, fitted with N counted both ways
(every parameter, or without the vocabulary's matrices), the count kept that predicts the largest size from
the smaller ones better; then the largest size's backtests, an iso-FLOP reading and an answer for a much
larger model (Phi-2).

Why both counts: at phi-tiny's width the embedding and LM head are 94% of the parameters and most of a step's
FLOPs, at Phi-2's 9%; Kaplan et al. (2020) fit the non-embedding count for that reason, Chinchilla (Hoffmann
et al. 2022) all of them at sizes where it matters less. Which describes a ladder is measured, not assumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from .law import LossLaw, fit_loss_law, predict_end
from .runs import ParameterCount, Run

PACKAGED = Path(__file__).with_name("clean_ladder.json")
"""The ladder bench/ladder.py measured on the project's clean corpus (shared/data/clean, Phi-2's tokenizer):
the demo's report takes phi-tiny's floor from it."""


@dataclass
class Ladder:
    """What a ladder says: its law (N counted as ``count``), the backtests behind the choice, and what it
    takes to predict a run of any size and length with the ladder's schedule."""

    count: ParameterCount
    law: LossLaw
    errors: dict[str, float]
    """Mean absolute relative error of the largest size's final losses predicted from the smaller sizes, for
    each way of counting N: the lower one is used."""
    backtests: list[dict]
    sizes: list[dict]
    """Each size's model, parameters counted both ways, and its runs."""
    tokens_per_step: float
    source: str = "the runs of this report"
    """Where the ladder was measured (what the report says beside a floor it takes from it)."""

    def size(self, model) -> float:
        """A model config's N as this ladder counts it."""
        return float(model.num_parameters if self.count == "total" else model.num_non_embedding_parameters)

    def floor(self, model) -> float | None:
        """The lowest loss the ladder's law gives ``model`` at any length (None: no floor seen)."""
        return self.law.floor_at(self.size(model))

    def to_dict(self) -> dict:
        return {"count": self.count, "law": self.law.to_dict(), "errors": self.errors,
                "backtests": self.backtests, "sizes": self.sizes, "tokens_per_step": self.tokens_per_step,
                "source": self.source}

    @classmethod
    def from_dict(cls, saved: dict) -> Ladder:
        return cls(saved["count"], LossLaw.from_dict(saved["law"]), saved["errors"], saved["backtests"],
                   saved["sizes"], saved["tokens_per_step"], saved.get("source", "a ladder read before"))

    @classmethod
    def read(cls, path: Path) -> Ladder:
        """A ladder saved by ``report`` (its ``ladder.json``, or a report.json holding one)."""
        saved = json.loads(Path(path).read_text())
        return cls.from_dict(saved.get("ladder", saved))


def sizes_of(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs grouped by model size, smallest first (every size must have a known model)."""
    groups: dict[int, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.parameters or 0, []).append(run)
    return [groups[n] for n in sorted(groups)]


def _largest_backtests(runs: Sequence[Run], count: ParameterCount, momentum: float | None) -> list[dict]:
    """Fit on every size but the largest, predict each run of the largest at its end."""
    *smaller, largest = sizes_of(runs)
    law = fit_loss_law([r.curve(count) for group in smaller for r in group], momentum, floor_at_least=0.0)
    fitted_tokens = max(r.evals[-1].tokens for group in smaller for r in group)
    out = []
    for run in largest:
        c = run.curve(count)
        s1, s2 = law.areas(c.rates)
        predicted = float(law.loss(s1[c.steps[-1]], s2[c.steps[-1]], c.parameters))
        out.append({"kind": "largest model", "count": count, "run": run.name, "step": int(c.steps[-1]),
                    "tokens": float(c.tokens[-1]), "reach": float(c.tokens[-1]) / fitted_tokens,
                    "held_back": f"{run.name}, from the {len(smaller)} smaller sizes",
                    "actual": float(c.losses[-1]), "predicted": predicted,
                    "error": (predicted - float(c.losses[-1])) / float(c.losses[-1])})
    return out


def fit_ladder(runs: Sequence[Run], momentum: float | None = None) -> Ladder:
    """The ladder's law over every run, N counted the way whose largest-size backtest errs least (three
    sizes or more: two fit the size term with γ held, and one cannot be held back)."""
    groups = sizes_of(runs)
    if len(groups) < 3:
        raise ValueError(f"a ladder needs three model sizes or more ({len(groups)} given)")
    if any(r.model is None for r in runs):
        raise ValueError("every run of a ladder needs its config.yaml (its model's size)")
    backtests = {count: _largest_backtests(runs, count, momentum) for count in get_args(ParameterCount)}
    errors = {count: float(np.mean([abs(b["error"]) for b in rows])) for count, rows in backtests.items()}
    count = min(errors, key=errors.get)
    law = fit_loss_law([r.curve(count) for r in runs], momentum, floor_at_least=0.0)
    sizes = [{"model": g[0].model.name, "total": g[0].count("total"),
              "non_embedding": g[0].count("non_embedding"), "runs": [r.name for r in g]} for g in groups]
    per_step = runs[0].curve().tokens_per_step
    return Ladder(count, law, errors, [b for rows in backtests.values() for b in rows], sizes, per_step)


def iso_flops(ladder: Ladder, schedule: Callable[[int], Callable[[np.ndarray], np.ndarray]],
              budgets: Sequence[float]) -> list[dict]:
    """For each compute budget C (FLOPs, counted 6·N·D with the ladder's N, as Kaplan and Chinchilla count):
    the size whose run of D = C/(6N) tokens ends lowest, and its tokens per parameter."""
    out = []
    for budget in budgets:
        sizes = np.geomspace(1e4, 1e11, 141)
        best = None
        for n in sizes:
            tokens = budget / (6 * n)
            steps = int(tokens / ladder.tokens_per_step)
            if steps < 50:  # shorter than a warmup and a decay: not a run
                continue
            loss, _ = predict_end(ladder.law, schedule(steps), steps, n)
            if best is None or loss < best[0]:
                best = (loss, n, steps * ladder.tokens_per_step)
        if best is not None:
            loss, n, tokens = best
            edge = n in (sizes[0], sizes[-1])
            out.append({"flops": float(budget), "parameters": float(n), "tokens": float(tokens),
                        "loss": float(loss), "tokens_per_parameter": float(tokens / n),
                        "at_search_edge": bool(edge)})
    return out


def answer_for(ladder: Ladder, model, tokens: float,
               schedule: Callable[[int], Callable[[np.ndarray], np.ndarray]], largest_tokens: float,
               reference: float | None) -> dict:
    """The loss the ladder's law gives ``model`` after ``tokens`` tokens, with its interval, how far that
    reaches past the ladder (in N and in D), and the ladder's own backtest error beside it."""
    n = ladder.size(model)
    steps = max(1, round(tokens / ladder.tokens_per_step))
    loss, interval = predict_end(ladder.law, schedule(steps), steps, n)
    largest = max(s[ladder.count] for s in ladder.sizes)
    furthest = max((b for b in ladder.backtests if b["count"] == ladder.count), key=lambda b: b["reach"])
    return {"model": model.name, "parameters": n, "count": ladder.count,
            "tokens": steps * ladder.tokens_per_step,
            "loss": loss, "interval": interval, "floor": ladder.floor(model), "reference": reference,
            "extrapolation_in_n": n / largest, "extrapolation_in_d": tokens / largest_tokens,
            "backtest_error": furthest["error"], "backtest_reach": furthest["reach"]}
