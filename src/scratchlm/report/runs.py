"""Reading runs for the report: a run folder's config, summary and records (``metrics.jsonl``), its label and
data setting, when it reached a loss, and the measures across runs (clean against stream, distillation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import read_jsonl

PHI2_BUDGET = {"tokens": 1.4e12, "gpus": 96, "gpu": "A100-80G", "days": 14, "gpu_hours": 96 * 14 * 24}
PHI2_WIKITEXT_LOSS = 2.273  # nats/token: perplexity 9.705 on WikiText-2, 2048-token windows (AutoAWQ PR #496)


TEACHER_FREE = 0.005
"""A feed run whose teacher wrote less than this share of its tokens counts as one without a teacher."""


def data_setting(run: dict) -> str:
    """What a run trained on: 'corpus' (one corpus or a mix, read directly), 'feed' (a feed with no teacher
    text: the feed's path alone) or 'stream' (a feed with teacher text)."""
    data = (run["config"].feed_url or run["config"].data) if run["config"] else None
    if not (data and data.startswith(("http://", "https://"))):
        return "corpus"
    return "stream" if (run["teacher_token_share"] or 0.0) >= TEACHER_FREE else "feed"


def by_data(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by what they trained on (every feed without teacher text counts as one, every feed with
    it as another): one loss law per group, since a curve on other text is another curve."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        kind = data_setting(run)
        key = {"feed": "a feed, no teacher text", "stream": "a feed with teacher text"}.get(
            kind, (run["config"].data if run["config"] else None) or "unknown data")
        groups.setdefault(key, []).append(run)
    return groups


def effects(rows: list[dict]) -> dict | None:
    """Clean against stream, like with like: what the feed's path alone changes (a feed run with no teacher
    against a corpus run) and what the teacher changes (a stream run against the feed run with no teacher),
    on the same held-out text where the runs were evaluated on one (else their own evaluations). None without
    at least two of the three kinds."""
    def loss(row: dict) -> float | None:
        return row.get("final_loss_on_eval_data", row["final_eval_loss"])

    by_kind: dict[str, list[float]] = {}
    for row in rows:
        if loss(row) is not None:
            by_kind.setdefault(row["data"], []).append(loss(row))
    mean = {kind: float(np.mean(values)) for kind, values in by_kind.items()}
    pairs = {"path": ("feed", "corpus"), "teacher": ("stream", "feed"), "total": ("stream", "corpus")}
    out = {name: mean[a] - mean[b] for name, (a, b) in pairs.items() if a in mean and b in mean}
    if not out:
        return None
    return {**out, "means": mean, "same_text": all("final_loss_on_eval_data" in r for r in rows)}


# ----------------------------------------------------------------------------------------------------------


def read_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    shares = [r["teacher_token_share"] for r in records if r.get("teacher_token_share") is not None]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    config = _run_config(run_dir)
    return {"name": run_dir.name, "dir": str(run_dir), "summary": summary, "config": config,
            "parameters": summary.get("parameters") or (config.preset().num_parameters if config else None),
            "train": [r for r in records if "loss" in r], "eval": [r for r in records if "eval_loss" in r],
            # What a stream run really trained on (every step has the same number of tokens: a plain mean).
            "teacher_token_share": sum(shares) / len(shares) if shares else None}


def _run_config(run_dir: Path):
    """The run's TrainConfig (its config.yaml), or None for a folder without one."""
    from ..config import read_yaml
    from ..train.config import TrainConfig

    path = run_dir / "config.yaml"
    return TrainConfig.model_validate(read_yaml(path)) if path.exists() else None


def run_label(run: dict) -> str:
    """A run's name, with the share of its tokens a teacher wrote when it trained from a feed."""
    share = run["teacher_token_share"]
    return run["name"] if share is None else f"{run['name']} (teacher {share:.1%} of tokens)"


def reach(evals: list[dict], target: float) -> tuple[float | None, float | None]:
    """Tokens and wall seconds at which a run's evaluations first reach ``target`` (interpolated between
    evaluations, in log tokens), or None."""
    evals = [r for r in evals if r["tokens"] > 0]
    if evals and evals[0]["eval_loss"] <= target:
        return float(evals[0]["tokens"]), float(evals[0]["elapsed_s"])
    for before, after in zip(evals, evals[1:], strict=False):
        if after["eval_loss"] <= target < before["eval_loss"]:
            f = (before["eval_loss"] - target) / (before["eval_loss"] - after["eval_loss"])
            log_tokens = np.log(before["tokens"]) + f * (np.log(after["tokens"]) - np.log(before["tokens"]))
            seconds = before["elapsed_s"] + f * (after["elapsed_s"] - before["elapsed_s"])
            return float(np.exp(log_tokens)), seconds
    return None, None


def distillation(runs: list[dict]) -> dict | None:
    """What a teacher's distribution bought: the tokens and wall time each run took to reach the final
    held-out loss of the first run that does not distil (from the runs' own evaluations), against that run's
    own. None unless some run distils."""
    distils = [r for r in runs if r["config"] is not None and r["config"].distill_weight > 0]
    plain = next((r for r in runs if r["config"] is not None and r["config"].distill_weight == 0
                  and r["eval"]), None)
    if not distils or plain is None:
        return None
    target = plain["eval"][-1]["eval_loss"]
    base_tokens, base_s = reach(plain["eval"], target)
    rows = {}
    for run in runs:
        tokens, seconds = reach(run["eval"], target)
        rows[run["name"]] = {"distill_weight": run["config"].distill_weight if run["config"] else None,
                             "tokens": tokens, "token_ratio": tokens / base_tokens if tokens else None,
                             "seconds": seconds,
                             "time_ratio": seconds / base_s if seconds and base_s else None}
    return {"plain_run": plain["name"], "target": target, "runs": rows}
