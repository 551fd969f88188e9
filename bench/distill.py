"""How many tokens does a teacher save? Distillation measured on the CPU, in the same runs, on the held-out
loss every run is compared on.

    python bench/distill.py --out runs/distill

1. The teacher: phi-20m trained on the whole corpus until its held-out loss is well below where the student
   ends (trained once, kept under --out).
2. The student's text: a part of the corpus (--subset-files, about 1.8M tokens: some of each kind) that the
   teacher scores once, ``scratchlm prepare --teacher local:TEACHER --soft-labels 20``: the whole corpus would
   take the CPU hours to score. The student, phi-tiny from random weights, sees the same blocks in the same
   order in every corpus run, the same token budget, wsd:
   - `plain`: cross-entropy;
   - `distill-A-kK`: (1 − A)·CE + A·KL with the teacher's top K (prepared), for A in --weights, K in --top-k;
   - `stream`: the seed's stream from a feed over the same text, 30% of tokens from the teacher, plain CE;
   - `stream-distill`: the same stream distilling at every token (the teacher's text from its generation,
     corpus text scored as it is served), with the first of --weights and the last of --top-k.
3. Every final model evaluated by `scratchlm eval` on the text's held-out documents and on the first 50k
   tokens of a corpus file outside the subset (--unseen: no student read it); from each run's own
   evaluations (every 10 steps, the same held-out blocks for all), the tokens and the wall time it took to
   reach the plain run's final loss. Wall time counts the teacher's: for prepared labels, the scoring time of
   the tokens the run read; for a stream, the teacher ran beside the trainer on the same machine.

Alone on the machine. Runs already finished are kept; the table goes to --out/distill.json and distill.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import spawn  # noqa: E402  (the launcher of a feed process, as the tests use it)
from stream_fairness import held_out_loss, scratchlm  # noqa: E402  (the same runs of the CLI and evaluation)

from scratchlm.files import read_jsonl  # noqa: E402
from scratchlm.report.runs import reach  # noqa: E402  (the report's own reading of a run)
from scratchlm.serving import free_port  # noqa: E402

STUDENT = ["--model", "phi-tiny", "--block-size", "256", "--micro-batch-size", "8", "--lr", "2e-3",
           "--warmup-steps", "10", "--lr-schedule", "wsd", "--eval-interval", "10", "--eval-batches", "4",
           "--checkpoint-interval", "1000", "--device", "cpu", "--seed", "1"]


def teacher(out: Path, corpus: str, steps: int) -> Path:
    run = out / "teacher-phi-20m"
    if not (run / "summary.json").exists():
        scratchlm("train", "--model", "phi-20m", "--data", corpus, "--out", str(run), "--max-steps",
                  str(steps), "--block-size", "256", "--micro-batch-size", "8", "--lr", "2e-3",
                  "--warmup-steps", "20", "--lr-schedule", "wsd", "--eval-interval", "100", "--eval-batches",
                  "4", "--device", "cpu", "--resume", "auto")
    return run / "final"


def student(out: Path, name: str, data: str, steps: int, train_flags: list[str],
            feed_flags: list[str] | None = None) -> Path:
    """A student run on ``data`` (a corpus), or with ``feed_flags`` on a feed over it."""
    run = out / name
    if (run / "summary.json").exists():
        return run
    server = None
    if feed_flags is not None:
        port = free_port()
        server = spawn(data, port, "--seed", "1", *feed_flags, timeout_s=600)
        data = f"http://127.0.0.1:{port}"
    try:
        scratchlm("train", "--data", data, "--out", str(run), "--max-steps", str(steps), "--resume", "auto",
                  *STUDENT, *train_flags)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    return run


def subset(corpus: str, out: Path, files: list[str]) -> str:
    """A part of the corpus, with the same relative paths (so the same document ids and held-out split)."""
    root = out / "text"
    for name in files:
        target = root / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((Path(corpus) / name).read_bytes())
    return str(root)


def evaluations(run: Path) -> list[dict]:
    """A run's own evaluations, from its metrics.jsonl."""
    return [r for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]


def prepared_seconds(run: Path, soft_meta: dict) -> float:
    """The teacher's share of a run's wall time when it read prepared labels: the scoring time of the tokens
    it read."""
    tokens = json.loads((run / "summary.json").read_text())["tokens"]
    return soft_meta["seconds"] * min(1.0, tokens / soft_meta["tokens"])


def plot(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for name, run in runs.items():
        ev = [r for r in evaluations(run) if r["tokens"] > 0]
        axes[0].plot([r["tokens"] for r in ev], [r["eval_loss"] for r in ev], "-", label=name)
        axes[1].plot([r["elapsed_s"] for r in ev], [r["eval_loss"] for r in ev], "-", label=name)
    for ax, label in zip(axes, ("training tokens", "wall time, s (the teacher's included)"), strict=True):
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (the runs' own evaluations)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUBSET = ["wikipedia/enwiki2015_AA_wiki_00.txt", "wikipedia/enwiki2015_AA_wiki_01.txt",
          "wikipedia/enwiki2015_AA_wiki_02.txt", "books/pg11_alices_adventures_in_wonderland.txt",
          "books/pg1342_pride_and_prejudice.txt", "books/pg84_frankenstein.txt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--subset-files", nargs="+", default=SUBSET)
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 20])
    p.add_argument("--unseen", default="wikipedia/enwiki2015_AA_wiki_03.txt",
                   help="a corpus file outside the subset: its first 50k tokens evaluated on as well")
    args = p.parse_args()
    out = Path(args.out)
    spec = f"local:{teacher(out, args.corpus, args.teacher_steps)}"
    text = subset(args.corpus, out, args.subset_files)
    prepared = json.loads(scratchlm("prepare", "--data", text, "--teacher", spec, "--soft-labels",
                                    str(max(args.top_k)), capture=True))[0]
    soft_meta = json.loads((Path(prepared["soft_labels"]["folder"]) / "meta.json").read_text())
    runs = {"plain": student(out, "plain", text, args.steps, [])}
    for a in args.weights:
        for k in args.top_k:
            runs[f"distill-{a}-k{k}"] = student(out, f"distill-{a}-k{k}", text, args.steps,
                                                ["--soft-labels", str(k), "--distill-weight", str(a)])
    stream = ["--teacher", spec, "--teacher-ratio", "0.3", "--teacher-max-new-tokens", "128"]
    runs["stream"] = student(out, "stream", text, args.steps, [], stream)
    a, k = args.weights[0], args.top_k[-1]
    runs["stream-distill"] = student(out, "stream-distill", text, args.steps,
                                     ["--soft-labels", str(k), "--distill-weight", str(a)],
                                     [*stream, "--soft-labels", str(k), "--score-corpus"])
    target = evaluations(runs["plain"])[-1]["eval_loss"]
    plain_tokens, plain_seconds = reach(evaluations(runs["plain"]), target)
    teacher_summary = json.loads((out / "teacher-phi-20m" / "summary.json").read_text())
    table = {"teacher": {"held_out_loss": held_out_loss(out / "teacher-phi-20m", text),
                         "tokens": teacher_summary["tokens"],
                         "final_eval_loss": teacher_summary["final_eval_loss"]},
             "text": {"files": args.subset_files, "train_tokens": prepared["train_tokens"],
                      "scoring_seconds": soft_meta["seconds"]},
             "target": target, "runs": {}}
    print(f"teacher phi-20m: held-out {table['teacher']['held_out_loss']:.4f} after "
          f"{table['teacher']['tokens']:,} tokens; scoring the text took {soft_meta['seconds']:.0f} s")
    unseen = str(Path(args.corpus) / args.unseen)
    print(f"\n{'run':<18} {'held-out':>9} {'unseen':>8} {'tokens to reach plain':>22} {'x plain':>8} "
          f"{'wall s':>8} {'x plain':>8}")
    for name, run in runs.items():
        tokens, seconds = reach(evaluations(run), target)
        offline = name.startswith("distill")
        extra = prepared_seconds(run, soft_meta) if offline and seconds is not None else 0.0
        seconds = seconds + extra if seconds is not None else None
        row = {"held_out_loss": held_out_loss(run, text), "unseen_loss": held_out_loss(
                   run, unseen, "--split", "all", "--max-tokens", "50000", cache="unseen_eval.json"),
               "tokens_to_reach": tokens,
               "token_ratio": tokens / plain_tokens if tokens else None, "seconds_to_reach": seconds,
               "time_ratio": seconds / plain_seconds if seconds else None, "teacher_seconds": extra}
        table["runs"][name] = row
        print(f"{name:<18} {row['held_out_loss']:>9.4f} {row['unseen_loss']:>8.4f} "
              f"{tokens or float('nan'):>22,.0f} "
              f"{row['token_ratio'] or float('nan'):>8.2f} {seconds or float('nan'):>8.0f} "
              f"{row['time_ratio'] or float('nan'):>8.2f}")
    (out / "distill.json").write_text(json.dumps(table, indent=1))
    plot(runs, out / "distill.png")
    scratchlm("report", *map(str, runs.values()), "--out", str(out / "report"))


if __name__ == "__main__":
    main()
