"""How many tokens does a teacher save? Distillation measured on the CPU against plain training on the same
text, on an evaluation big enough to tell 0.05 nats from noise, with a teacher that knows more than its
students on that text.

    python bench/distill.py --out runs/distill

1. The students' text: the first --subset-chars of files from every part of the corpus (wikipedia, books,
   code, arXiv; the same relative paths, so the same documents are held out).
2. The teacher: --teacher-model (phi-tiny) trained on that text (its held-out share held out) for
   --teacher-steps, a wsd schedule: the distribution its students read, and well past where they will end
   (its loss on their held-out share, on the corpus's held-out split and on the unseen file is printed beside
   theirs). The text is then scored once by `scratchlm prepare --teacher local:TEACHER --soft-labels K` (its
   time is the offline cost).
3. Students (--model, from random weights, --steps each, two seeds: model and data order; a constant
   learning rate after the warmup, so that their curves can be read against each other), every run a
   `scratchlm` command:
   - `plain`: cross-entropy on the text;
   - `feed`: cross-entropy on the same text through a feed (no teacher): the control of every run from a feed;
   - `prepared-A`: (1 − A)·CE + A·KL from the prepared top K, for A in --weights (against plain);
   - `live-A`: the same from a feed over the text whose teacher scores every token as it is served
     (`serve --teacher local:TEACHER --soft-labels K --score-corpus`), the teacher on the same cores (against
     feed);
   - `stream` / `stream-distill`: the seed's stream (30% of tokens written by the teacher), cross-entropy, or
     distilling at every token (A the last of --weights) (against feed).
4. Every final model evaluated by `scratchlm eval` on the corpus's held-out split (all of it: 29 documents,
   53,353 tokens) and on the first 50k tokens of a file no student read (--unseen). From each run's own
   evaluations (every 10 steps, 8 batches of 8 x 256 of their held-out share, the same blocks for all): the
   tokens and the wall time it took to reach its seed's control's final loss (plain for a corpus run, feed
   for a feed run). Wall time counts the teacher's: for prepared labels, the scoring time of the tokens the
   run read; live and stream runs had the teacher beside them.
5. Break-even: the prepared text's scoring time against the training time each distilled run saves.

Alone on the machine. Runs already finished are kept; the table goes to --out/distill.json and the curves to
distill.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feed_load import spawn  # noqa: E402  (the one launcher of a feed process, shared with the tests)
from stream_fairness import scratchlm  # noqa: E402  (a command as a user types it)

from scratchlm.files import read_jsonl  # noqa: E402
from scratchlm.reporting.runs import EvalRecord, reach  # noqa: E402  (the report's own reading of a run)
from scratchlm.serving import free_port  # noqa: E402

COMMON = ["--block-size", "256", "--micro-batch-size", "8", "--lr", "2e-3", "--warmup-steps", "10",
          "--eval-interval", "10", "--eval-batches", "8", "--checkpoint-interval", "1000", "--device", "cpu",
          "--resume", "auto"]
# Students at a constant learning rate after the warmup: each of a run's evaluations is then of a model
# trained as its control was at that point, so "tokens to reach the control's final loss" reads off the two
# curves. Under wsd the control's last 0.2 nats come in its final decay, which a distilled run only has at its
# own end: the read would measure the schedule. The teacher, trained once to be good, decays (wsd).
STUDENT_SCHEDULE, TEACHER_SCHEDULE = ["--lr-schedule", "constant"], ["--lr-schedule", "wsd"]
# The students' text holds out a tenth more than the corpus does (the same hash of each document's id, so a
# superset of the corpus's held-out documents): their own evaluations, from which the tokens to a loss are
# read, see about 50k tokens rather than three documents.
STUDENT = ["--eval-fraction", "0.05"]
SUBSET = ["wikipedia/enwiki2015_AA_wiki_00.txt", "wikipedia/enwiki2015_AA_wiki_01.txt",
          "wikipedia/enwiki2015_AA_wiki_02.txt", "wikipedia/enwiki2015_AA_wiki_03.txt",
          "books/pg11_alices_adventures_in_wonderland.txt", "books/pg1342_pride_and_prejudice.txt",
          "books/pg84_frankenstein.txt", "books/pg2701_moby_dick.txt", "code/python_flask.txt",
          "code/python_click.txt", "arxiv/unarxive_arXiv_src_2212_086_part1.txt"]
UNSEEN = "wikipedia/enwiki2015_AA_wiki_10.txt"


def train(run: Path, data: str, model: str, steps: int, seed: int, *flags: str,
          schedule: list[str] = STUDENT_SCHEDULE) -> Path:
    """``scratchlm train`` (the students' settings in ``flags``), unless the run finished before."""
    if not (run / "summary.json").exists():
        scratchlm("train", "--data", data, "--out", str(run), "--model", model, "--max-steps", str(steps),
                  "--seed", str(seed), *COMMON, *schedule, *flags)
    return run


def on_feed(run: Path, text: str, model: str, steps: int, seed: int, feed_flags: list[str],
            train_flags: list[str]) -> Path:
    """A student run from a feed over ``text`` started with ``feed_flags`` (its teacher on the same cores)."""
    if (run / "summary.json").exists():
        return run
    port = free_port()
    server = spawn(text, port, "--seed", str(seed), *STUDENT, *feed_flags, timeout_s=600)
    try:
        return train(run, f"http://127.0.0.1:{port}", model, steps, seed, *STUDENT, *train_flags)
    finally:
        server.kill()
        server.wait()


def subset(corpus: str, out: Path, files: list[str], chars: int) -> str:
    """The first ``chars`` characters of each file (at a paragraph break), with the same relative paths: the
    same documents, so the same ones are held out."""
    root = out / "text"
    for name in files:
        target = root / name
        if not target.exists():
            text = (Path(corpus) / name).read_text(encoding="utf-8")
            cut = text.rfind("\n\n", 0, chars) if len(text) > chars else len(text)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text[: cut if cut > 0 else chars], encoding="utf-8")
    return str(root)


def evaluations(run: Path) -> list[EvalRecord]:
    """A run's own evaluations, from its metrics.jsonl."""
    return [EvalRecord(r["step"], r["tokens"], r["eval_loss"], r.get("elapsed_s"))
            for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]


def evaluate(run: Path, data: str, name: str, *flags: str) -> float:
    """`scratchlm eval` of the run's final model (cached beside it)."""
    cached = run / f"{name}.json"
    if not cached.exists():
        cached.write_text(scratchlm("eval", "--model", str(run / "final"), "--data", data, "--block-size",
                                    "256", "--device", "cpu", "--json", *flags, capture=True))
    return json.loads(cached.read_text())["loss"]


def plot(runs: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for name, seeds in runs.items():
        for n, run in enumerate(seeds):
            ev = [r for r in evaluations(run) if r.tokens > 0]
            for ax, x in zip(axes, ([r.tokens for r in ev], [r.elapsed_s for r in ev]), strict=True):
                ax.plot(x, [r.eval_loss for r in ev], "-" if n == 0 else "--",
                        color=f"C{list(runs).index(name)}", label=name if n == 0 else None)
    for ax, label in zip(axes, ("training tokens", "wall time, s (the teacher's beside the run included)"),
                         strict=True):
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (the runs' own evaluations; seed 2 dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--model", default="phi-tiny", help="the students")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--teacher-model", default="phi-tiny")
    p.add_argument("--teacher-steps", type=int, default=1200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--subset-files", nargs="+", default=SUBSET)
    p.add_argument("--subset-chars", type=int, default=400_000)
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--wide-k", type=int, nargs="*", default=[],
                   help="also the best weight's prepared and live rows with these k (prepared once more)")
    p.add_argument("--unseen", default=UNSEEN, help="a corpus file outside the subset: its first 50k tokens")
    args = p.parse_args()
    out, k = Path(args.out), str(args.top_k)

    text = subset(args.corpus, out, args.subset_files, args.subset_chars)
    # The teacher reads the students' text (their held-out share held out from it too), evaluated rarely: what
    # it knows of that distribution is what distilling can pass on.
    teacher = train(out / "teacher", text, args.teacher_model, args.teacher_steps, 1, *STUDENT,
                    "--eval-interval", "200", schedule=TEACHER_SCHEDULE)
    local = f"local:{teacher / 'final'}"
    prepared = json.loads(scratchlm("prepare", "--data", text, "--teacher", local, "--soft-labels", k,
                                    "--device", "cpu", *STUDENT, capture=True))[0]
    soft_meta = json.loads((Path(prepared["soft_labels"]["folder"]) / "meta.json").read_text())
    a_last = str(args.weights[-1])
    plans: dict[str, tuple[list[str] | None, list[str]]] = {"plain": (None, []), "feed": ([], [])}
    for a in args.weights:
        distill = ["--soft-labels", k, "--distill-weight", str(a), "--soft-label-teacher", local]
        plans[f"prepared-{a}"] = (None, distill)
        plans[f"live-{a}"] = (["--teacher", local, "--soft-labels", k, "--score-corpus"], distill[:4])
    for wide in args.wide_k:  # the last weight, more of the teacher's distribution
        scratchlm("prepare", "--data", text, "--teacher", local, "--soft-labels", str(wide), "--device",
                  "cpu", *STUDENT, capture=True)
        distill = ["--soft-labels", str(wide), "--distill-weight", a_last, "--soft-label-teacher", local]
        plans[f"prepared-{a_last}-k{wide}"] = (None, distill)
        plans[f"live-{a_last}-k{wide}"] = (["--teacher", local, "--soft-labels", str(wide), "--score-corpus"],
                                           distill[:4])
    stream = ["--teacher", local, "--teacher-ratio", "0.3"]
    plans["stream"] = (stream, [])
    plans["stream-distill"] = ([*stream, "--soft-labels", k, "--score-corpus"],
                               ["--soft-labels", k, "--distill-weight", a_last])
    runs: dict[str, list[Path]] = {name: [] for name in plans}
    for seed in args.seeds:
        for name, (feed, flags) in plans.items():
            run = out / f"{name}-s{seed}"
            runs[name].append(train(run, text, args.model, args.steps, seed, *STUDENT, *flags) if feed is None
                              else on_feed(run, text, args.model, args.steps, seed, feed, flags))

    unseen = str(Path(args.corpus) / args.unseen)

    def losses(run: Path) -> tuple[float, float]:
        return (evaluate(run, args.corpus, "held_out_eval"),
                evaluate(run, unseen, "unseen_eval", "--split", "all", "--max-tokens", "50000"))

    teacher_loss = losses(teacher)
    teacher_own = evaluations(teacher)[-1].eval_loss  # on the students' held-out share, as their curves
    table = {"teacher": {"model": args.teacher_model, "steps": args.teacher_steps, "own": teacher_own,
                         "held_out": teacher_loss[0], "unseen": teacher_loss[1]},
             "text": {"files": args.subset_files, "chars": args.subset_chars,
                      "train_tokens": prepared["train_tokens"], "scoring_seconds": soft_meta["seconds"]},
             "runs": {}}
    print(f"\nteacher {args.teacher_model}, {args.teacher_steps} steps: the students' held-out share "
          f"{teacher_own:.4f} (their curves' text), held-out {teacher_loss[0]:.4f}, "
          f"unseen {teacher_loss[1]:.4f}; the students' text: {prepared['train_tokens']:,} tokens, scored "
          f"in {soft_meta['seconds']:.0f} s")
    print(f"\n{'run':<16} {'seed':>4} {'held-out':>9} {'unseen':>8} {'control':>8} {'tokens to it':>13} "
          f"{'x its':>6} {'wall s':>7} {'x its':>6}")
    for name, seeds in runs.items():
        rows = []
        control = "feed" if plans[name][0] is not None and name != "feed" else "plain"
        for seed, run, plain in zip(args.seeds, seeds, runs[control], strict=True):
            target = evaluations(plain)[-1].eval_loss
            plain_tokens, plain_seconds = reach(evaluations(plain), target)
            tokens, seconds = reach(evaluations(run), target)
            summary = json.loads((run / "summary.json").read_text())
            # prepared labels: the scoring time of the tokens the run read
            scoring = (soft_meta["seconds"] * min(1.0, summary["tokens"] / soft_meta["tokens"])
                       if name.startswith("prepared") else 0.0)
            held_out, unseen_loss = losses(run)
            row = {"seed": seed, "control": control, "held_out": held_out, "unseen": unseen_loss,
                   "tokens_to_control": tokens,
                   "token_ratio": tokens / plain_tokens if tokens else None,
                   "seconds_to_control": seconds + scoring if seconds is not None else None,
                   "time_ratio": (seconds + scoring) / plain_seconds if seconds is not None else None,
                   "train_seconds": summary["elapsed_s"], "scoring_seconds": scoring}
            rows.append(row)
            reached = (f"{tokens:>13,.0f} {row['token_ratio']:>6.2f} {row['seconds_to_control']:>7.0f} "
                       f"{row['time_ratio']:>6.2f}" if tokens else f"{'not reached':>13}")
            print(f"{name:<16} {seed:>4} {held_out:>9.4f} {unseen_loss:>8.4f} {control:>8} {reached}")
        table["runs"][name] = rows
    best = _best(table)
    table["best"], table["break_even"] = best, _break_even(table, soft_meta["seconds"])
    (out / "distill.json").write_text(json.dumps(table, indent=1))
    plot(runs, out / "distill.png")


def _best(table: dict) -> dict | None:
    """The distilled kind whose worse seed needs the fewest tokens to reach its control's final loss."""
    distilled = [n for n in table["runs"] if n.startswith(("prepared", "live", "stream-distill"))]
    worst = {name: max(r["token_ratio"] for r in table["runs"][name]) for name in distilled
             if all(r["token_ratio"] for r in table["runs"][name])}
    if not worst:
        print("\nno distilled run reached its control's final loss on every seed")
        return None
    name = min(worst, key=worst.get)
    control = table["runs"][name][0]["control"]
    mean = statistics.mean(r["held_out"] for r in table["runs"][name])
    base = statistics.mean(r["held_out"] for r in table["runs"][control])
    print(f"\nbest: {name}, {worst[name]:.2f}x {control}'s tokens on its worse seed (target <= 0.6x: "
          f"{'met' if worst[name] <= 0.6 else 'missed'}); held-out {mean - base:+.4f} nats against {control}")
    return {"run": name, "control": control, "worst_token_ratio": worst[name], "held_out_gain": mean - base}


def _break_even(table: dict, scoring_seconds: float) -> dict | None:
    """After how many student runs over the same prepared text the offline scoring is paid back by the
    training time each saves (to plain's final loss), for the prepared kind whose worse seed needs the fewest
    tokens."""
    def worse_seed(name: str) -> float:
        return max(r["token_ratio"] or float("inf") for r in table["runs"][name])

    prepared = [n for n in table["runs"] if n.startswith("prepared")]
    if not prepared:
        return None
    name = min(prepared, key=worse_seed)
    pairs = zip(table["runs"][name], table["runs"]["plain"], strict=True)  # prepared: against plain
    rows = [(r, p) for r, p in pairs if r["token_ratio"]]
    if not rows:
        print(f"\nbreak-even: no prepared run reached plain's final loss; {scoring_seconds:.0f} s of scoring "
              "never paid back")
        return None
    # training time to plain's final loss, saved against plain's (the distilled step costs more per token)
    saved = statistics.mean(p["train_seconds"] - r["train_seconds"] * r["token_ratio"] for r, p in rows)
    runs = scoring_seconds / saved if saved > 0 else None
    print(f"break-even ({name}): scoring the text once took {scoring_seconds:.0f} s; "
          + (f"each student run reaches plain's loss {saved:.0f} s of training sooner: paid back after "
             f"{runs:.1f} runs" if runs else
             f"a student run reaches plain's loss {-saved:.0f} s of training later: never paid back"))
    return {"run": name, "scoring_seconds": scoring_seconds, "saved_per_run_s": saved, "runs": runs}


if __name__ == "__main__":
    main()
