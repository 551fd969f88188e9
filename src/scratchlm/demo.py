"""``scratchlm demo``: the seed project end to end, on the embedded defaults, on a CPU, answering both halves
of its question (does a teacher's *text* help; does its *knowledge*, its distribution, help), each against a
control that differs from it in one thing only.

1. the teacher: the model trained on the corpus three times as long as the students; run "clean", the
   students' control on the corpus, is a branch of it (a wsd decay off its checkpoint: the same run as a
   student-length one, for a fifth of the compute);
2. a feed server on loopback over the same corpus, no teacher; run "feed" reads the corpus through it: the
   path alone (feed − clean);
3. the teacher served through the OpenAI-compatible API (as any peer would be);
4. run "stream": the feed with the teacher writing a share of the tokens, plain cross-entropy: its text
   (stream − feed);
5. run "knowledge": the corpus through a feed whose teacher scores every token, the student distilling from
   its distribution: its knowledge (knowledge − feed);
6. the teacher and the four runs evaluated on the same held-out documents;
7. the report: each run against its control (loss, tokens and wall time to the control's loss, the teacher's
   seconds apart), curves against tokens and wall time, the gap to Phi-2 and how much more training it would
   take.

Data and tokenizer come from SCRATCHLM_DATA / SCRATCHLM_TOKENIZER (the tokenizer otherwise from the hub).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigBase, ConfigError
from .teacher.settings import Sampling, TeacherSampling

log = logging.getLogger("scratchlm.demo")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the runs: the full plan takes about 7 minutes on a 2-core CPU, ``--quick`` about 1."""

    model: str = "phi-tiny"
    block_size: int = 256
    micro_batch_size: int = 8
    max_steps: int = 64
    """The students' steps (the four runs compared)."""
    teacher_steps: int = 176
    """The teacher's: three times the students', so it knows measurably more than they will."""
    eval_interval: int = 8
    eval_batches: int = 2
    teacher_eval_interval: int = 32
    """The teacher's evaluations after the branch (before it, the students' interval: the clean run's
    curve)."""
    texts_per_request: int = 4
    """Texts a student's loader asks of its feed at a time: the last request overshoots what the run needs
    by at most this many (text a teacher scored or wrote for nothing)."""
    lr: float = 2e-3
    warmup_steps: int = 10
    teacher_ratio: float = 0.3
    """Share of the stream run's tokens that the teacher writes."""
    soft_labels: int = 20
    """The teacher's top-k the knowledge run learns from (what vLLM and OpenAI give at most)."""
    distill_weight: float = 0.5
    """A of the knowledge run: the share of its loss that is the KL to the teacher (bench/distill.py)."""
    teacher_sampling: Sampling = field(default_factory=Sampling)
    """How the teacher writes (the feed's --teacher-* settings)."""
    eval_tokens: int = 20_000
    seed_spread: tuple[float, str] = (0.013, "two corpus seeds of phi-tiny, block 256, batch 8, "
                                             "bench/stream_fairness.py")
    """How far two seeds of a control land apart, and where that was measured: the scale of the answers."""

    @property
    def branch_step(self) -> int:
        """Where the clean run's decay branches off the teacher: a wsd run of ``max_steps`` decays over its
        last fifth (``TrainConfig.decay_fraction``)."""
        from .training import TrainConfig

        return self.max_steps - round(TrainConfig().decay_fraction * self.max_steps)


QUICK = DemoPlan(block_size=64, micro_batch_size=4, max_steps=24, teacher_steps=72, eval_interval=2,
                 eval_batches=2, teacher_eval_interval=8, lr=3e-3, warmup_steps=3,
                 teacher_sampling=Sampling(max_new_tokens=16), eval_tokens=4_000)

RUNS = ("clean", "feed", "stream", "knowledge", "teacher")


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def demo(out: Path, plan: DemoPlan) -> dict:
    from .data import corpus_from_env, held_out_documents
    from .tokenizer import load_tokenizer

    corpus = corpus_from_env(None)
    if not corpus:
        raise ConfigError("the demo trains on a clean corpus: set SCRATCHLM_DATA to a folder or .zip of text "
                          "(for example the seed's sample.zip, or this repository's ../shared/data/clean)")
    tokenizer = load_tokenizer()  # fails early, with its clear message, if no tokenizer can be found
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = {name: out / name for name in RUNS}
    common = dict(model=plan.model, block_size=plan.block_size, micro_batch_size=plan.micro_batch_size,
                  eval_interval=plan.eval_interval, eval_batches=plan.eval_batches, lr=plan.lr,
                  warmup_steps=plan.warmup_steps, target_loss="auto", continue_after_target=True,
                  lr_schedule="wsd",  # the schedule whose curves the report's loss law can extend
                  device="cpu", log_interval=max(1, plan.eval_interval // 2), resume="auto")
    students = dict(common, max_steps=plan.max_steps, checkpoint_interval=plan.max_steps,
                    feed_texts_per_request=plan.texts_per_request)
    _teacher_and_clean(corpus, runs, common, students, plan)
    teacher_seconds = _feed_runs(corpus, runs, students, plan)

    _banner("6/7 the teacher and the four runs on the same held-out documents")
    evals = _evaluate(runs, held_out_documents(corpus), tokenizer, plan)

    _banner("7/7 report")
    report = _report(out, runs, evals, teacher_seconds, plan)
    answers = (report["comparisons"] or {}).get("answers", {})
    summary = {"out": str(out), "report": str(out / "report" / "report.md"), "held_out_eval": evals,
               "teacher_seconds": teacher_seconds, "wall_s": time.perf_counter() - started,
               "runs": {r["run"]: {"kind": r["kind"], "initial": r["initial_loss"],
                                   "final": r["final_eval_loss"], "target_reached": r["target_reached"],
                                   "tokens": r["tokens"], "wall_s": r["wall_s"],
                                   "teacher_token_share": r["teacher_token_share"]} for r in report["runs"]},
               "answers": answers, "comparisons": report["comparisons"]}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    for name, value in answers.items():
        print(f"{name}: {value:+.3f} nats/token")
    print(f"\ndone in {summary['wall_s']:.0f} s. Report: {summary['report']} (plots beside it); runs: "
          f"{', '.join(str(r) for r in runs.values())}; summary: {out / 'demo_summary.json'}")
    return summary


def _teacher_and_clean(corpus: str, runs: dict[str, Path], common: dict, students: dict,
                       plan: DemoPlan) -> None:
    """Step 1: the teacher, trained to the branch step, the clean run branched off it there, then the teacher
    on to its own end. A wsd run is constant until its decay, so the clean run is exactly a run of the
    students' length (tests/training/test_train.py shows it), and its history up to the branch is the
    teacher's."""
    from .training import TrainConfig, train
    from .training.checkpoint import checkpoint_dir

    _banner(f"1/7 the teacher: {plan.model} on the corpus for {plan.teacher_steps} steps; run 'clean' (the "
            f"students' {plan.max_steps} steps) branched off it at step {plan.branch_step}")
    teacher = dict(common, data=corpus, out=str(runs["teacher"]), lr_decay_steps=plan.teacher_steps,
                   checkpoint_interval=plan.teacher_steps)
    if not (runs["clean"] / "summary.json").exists():
        train(TrainConfig(**teacher, max_steps=plan.branch_step))
        branch = checkpoint_dir(runs["teacher"], plan.branch_step)
        train(TrainConfig(**students, data=corpus, out=str(runs["clean"]), resume_from=str(branch),
                          decay_steps=plan.max_steps - plan.branch_step))
    train(TrainConfig(**{**teacher, "eval_interval": plan.teacher_eval_interval},
                      max_steps=plan.teacher_steps))


def _feed_runs(corpus: str, runs: dict[str, Path], students: dict, plan: DemoPlan) -> dict[str, float]:
    """Steps 2 to 5: the feed run, then the teacher served and the two runs it teaches; returns the seconds
    the teacher's engine worked during each."""
    from . import serve_model
    from .config import validate
    from .feed.server import ServeConfig, serve_background
    from .training import TrainConfig, train

    def feed(backend=None, **settings):  # a teacher object in this process, beside those settings name
        return serve_background(validate(ServeConfig, {"corpus": corpus, "port": 0, **settings}, "demo"),
                                backend)

    _banner("2/7 run 'feed': the corpus through a feed server on loopback, no teacher (the path alone)")
    server = feed()
    try:
        train(TrainConfig(**students, data=server.url, out=str(runs["feed"])))
    finally:
        server.stop()

    _banner("3/7 the teacher served (OpenAI-compatible /v1/completions on loopback)")
    # Not compiled: the teacher shares the 2 cores with a trainer here, and the compiler's 20-40 s at start
    # was not measured against what it saves the stream run (serve-model compiles by default when alone).
    teacher = serve_model(str(runs["teacher"] / "final"), batch_size=32, device="cpu", compile=False)
    print(f"teacher: {teacher.url}")
    engine = teacher.teacher.engine
    # The stream's feed calls the served teacher as it would any peer; its pool of ready texts is one engine
    # batch, so that little is written that no step reads. The knowledge run's feed scores with the same
    # teacher in this process: prompt_logprobs over HTTP carry 20 entries of JSON a token, which took the
    # teacher five times its own work here.
    feeds = {"stream": dict(teacher=f"openai:{teacher.url}", teacher_ratio=plan.teacher_ratio,
                            teacher_buffer=32, **TeacherSampling.flags(plan.teacher_sampling)),
             "knowledge": dict(soft_labels=plan.soft_labels, score_corpus=True)}
    given = {"stream": None, "knowledge": teacher.teacher}
    distill = {"stream": {},
               "knowledge": dict(soft_labels=plan.soft_labels, distill_weight=plan.distill_weight)}
    titles = {"stream": f"4/7 run 'stream': {plan.teacher_ratio:.0%} of its tokens written by the teacher, "
                        "plain cross-entropy (the teacher's text)",
              "knowledge": "5/7 run 'knowledge': the corpus through a feed whose teacher scores every token, "
                           f"distilling from its top {plan.soft_labels} (A {plan.distill_weight}; the "
                           "teacher's knowledge)"}
    seconds = {}
    try:
        for name in ("stream", "knowledge"):
            _banner(titles[name])
            busy = engine.stats.busy_s
            server = feed(given[name], **feeds[name])
            try:
                train(TrainConfig(**students, data=server.url, out=str(runs[name]), **distill[name]))
            finally:
                server.stop()
            seconds[name] = engine.stats.busy_s - busy
            print(f"the teacher worked {seconds[name]:.0f} s during run '{name}'")
    finally:
        teacher.stop()
    return seconds


def _evaluate(runs: dict[str, Path], held_out: list[str], tokenizer, plan: DemoPlan) -> dict[str, dict]:
    import torch

    from .evaluation import evaluate_model

    evals = {}
    for name, run in runs.items():
        evals[name] = evaluate_model(str(run / "final"), held_out, tokenizer, plan.block_size,
                                     torch.device("cpu"), max_tokens=plan.eval_tokens).to_dict()
        print(f"{name}: loss {evals[name]['loss']:.3f}, perplexity {evals[name]['perplexity']:,.0f}, "
              f"{evals[name]['bits_per_byte']:.3f} bits/byte")
    return evals


def _report(out: Path, runs: dict[str, Path], evals: dict[str, dict], teacher_seconds: dict[str, float],
            plan: DemoPlan) -> dict:
    from .reporting.command import ReportRequest, build_report
    from .reporting.ladder import PACKAGED as PACKAGED_LADDER
    from .reporting.runs import PHI2_WIKITEXT_LOSS

    # Phi-2's weights are not fetched by the demo: its published WikiText-2 loss stands in (other text, so a
    # yardstick, not a like-for-like comparison; `scratchlm report --reference-model` measures it on yours).
    # The floor phi-tiny cannot show in one run comes from the ladder measured on this corpus
    # (bench/ladder.py): no token count to a loss its size never reaches.
    return build_report(ReportRequest(
        runs=list(runs.values()), out=out / "report",
        reference=("Phi-2 (published WikiText-2 loss, other text)", PHI2_WIKITEXT_LOSS),
        eval_losses={name: e["loss"] for name, e in evals.items()}, teacher_run="teacher",
        teacher_seconds=teacher_seconds, seed_spread=plan.seed_spread, ladder=PACKAGED_LADDER))


class DemoConfig(ConfigBase):
    """The whole project end to end on a CPU: a teacher trained on the corpus, a run on the corpus (a branch
    of it), the same corpus through a feed (the path alone), the teacher's text in the stream, its knowledge
    distilled at every token, all evaluated alike, and the report."""

    out: str = "runs/demo"
    """Output folder."""
    quick: bool = False
    """Toy sizes: about a minute (used by the tests)."""


def run_demo(cfg: DemoConfig) -> None:
    demo(Path(cfg.out), QUICK if cfg.quick else DemoPlan())
