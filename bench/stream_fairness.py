"""Is a feed run a fair stand-in for a corpus run? Corpus runs and feed runs with no teacher over the same
corpus, evaluated by `scratchlm eval` on the same held-out documents: what separates them is the path, not a
teacher.

    python bench/stream_fairness.py --out runs/fairness                     # the issue's check
    python bench/stream_fairness.py --out runs/fairness --sweep 0 64 256    # + feed runs at other buffers

Every run is a `scratchlm` command, as a user types it: `scratchlm serve --corpus CORPUS --seed S` (no
teacher), `scratchlm train --data CORPUS|URL ...` (phi-tiny, block 256, batch 8, wsd), `scratchlm eval ...
--json`. Runs that finished are not trained again (the folder is kept under --out). Alone on the machine: two
jobs at once slow torch many times over on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feed_load import spawn  # noqa: E402  (the one launcher of a feed process, shared with the tests)

from scratchlm.serving import free_port  # noqa: E402

TRAIN = ["--model", "phi-tiny", "--block-size", "256", "--micro-batch-size", "8", "--lr", "2e-3",
         "--warmup-steps", "10", "--lr-schedule", "wsd", "--eval-interval", "50", "--eval-batches", "4",
         "--checkpoint-interval", "1000", "--device", "cpu"]


def scratchlm(*args: str, capture: bool = False) -> str:
    r = subprocess.run([sys.executable, "-m", "scratchlm", *args], check=True, text=True,
                       stdout=subprocess.PIPE if capture else None)
    return r.stdout if capture else ""


def train(out: Path, data: str, seed: int, steps: int, *extra: str) -> None:
    if (out / "summary.json").exists():
        return
    scratchlm("train", "--data", data, "--out", str(out), "--seed", str(seed), "--max-steps", str(steps),
              "--resume", "auto", *TRAIN, *extra)


def held_out_loss(run: Path, corpus: str, *flags: str, cache: str = "held_out_eval.json") -> float:
    """`scratchlm eval` on the corpus's held-out documents, or as ``flags`` say (cached beside the run)."""
    cached = run / cache
    if not cached.exists():
        cached.write_text(scratchlm("eval", "--model", str(run / "final"), "--data", corpus, "--block-size",
                                    "256", "--device", "cpu", "--json", *flags, capture=True))
    return json.loads(cached.read_text())["loss"]


def feed_run(out: Path, corpus: str, seed: int, steps: int, shuffle_blocks: int) -> None:
    if (out / "summary.json").exists():
        return
    port = free_port()
    server = spawn(corpus, port, "--seed", str(seed))
    try:
        train(out, f"http://127.0.0.1:{port}", seed, steps, "--feed-shuffle-blocks", str(shuffle_blocks))
    finally:
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--out", default="runs/fairness")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shuffle-blocks", type=int, default=1024, help="the feed runs' buffer (the default)")
    p.add_argument("--sweep", type=int, nargs="*", default=[],
                   help="other buffer sizes, one feed run each with the first seed (0 = no shuffling)")
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        train(out / f"corpus-s{seed}", args.corpus, seed, args.steps)
        rows.append(("corpus", seed, "-", held_out_loss(out / f"corpus-s{seed}", args.corpus)))
        feed_run(out / f"feed-s{seed}", args.corpus, seed, args.steps, args.shuffle_blocks)
        rows.append(("feed", seed, args.shuffle_blocks, held_out_loss(out / f"feed-s{seed}", args.corpus)))
    for blocks in args.sweep:
        if blocks == args.shuffle_blocks:
            continue
        run = out / f"feed-s{args.seeds[0]}-b{blocks}"
        feed_run(run, args.corpus, args.seeds[0], args.steps, blocks)
        rows.append(("feed", args.seeds[0], blocks, held_out_loss(run, args.corpus)))

    print(f"\n{'data':<7} {'seed':>4} {'shuffle blocks':>14} {'held-out loss':>13}")
    for data, seed, blocks, loss in rows:
        print(f"{data:<7} {seed:>4} {blocks!s:>14} {loss:>13.4f}")
    corpus = [loss for data, _, _, loss in rows if data == "corpus"]
    feed = [loss for data, _, blocks, loss in rows if data == "feed" and blocks == args.shuffle_blocks]
    gap = statistics.mean(feed) - statistics.mean(corpus)
    spread = max(corpus) - min(corpus)
    allowed = max(0.03, spread)
    print(f"\ncorpus mean {statistics.mean(corpus):.4f} (seeds spread {spread:.4f}); feed mean "
          f"{statistics.mean(feed):.4f}; gap {gap:+.4f} nats; allowed {allowed:.4f} "
          f"(0.03 or the corpus seeds' spread): {'PASS' if abs(gap) <= allowed else 'FAIL'}")
    (out / "fairness.json").write_text(json.dumps({"rows": rows, "gap": gap, "corpus_spread": spread,
                                                   "allowed": allowed}, indent=1))


if __name__ == "__main__":
    main()
