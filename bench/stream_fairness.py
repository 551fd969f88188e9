"""Is a feed run a fair stand-in for a corpus run, at every block and batch size a user would pick? Corpus
runs and feed runs with no teacher over the same corpus, two seeds of each, evaluated by `scratchlm eval` on
the same held-out documents at the run's block size: what separates them is the path, not a teacher.

    python bench/stream_fairness.py --out runs/fairness                      # the sweep: four sizes
    python bench/stream_fairness.py --out runs/fairness --sizes 128x16 --feed-flags --feed-shuffle-tokens 0
    python bench/stream_fairness.py --out runs/fairness --sizes 64x32 --feed-flags --feed-whole-documents

Sizes are BLOCKxBATCH with the same tokens a step (2,048 by default: 64x32, 128x16, 256x8, 512x4, 1024x2).
Every run is a `scratchlm` command, as a user types it: `scratchlm serve --corpus CORPUS --seed S` (no
teacher), `scratchlm train --data CORPUS|URL ...` (phi-tiny, wsd), `scratchlm eval ... --json`. Runs that
finished are not trained again (the folder is kept under --out). Alone on the machine: two jobs at once slow
torch many times over on 2 cores.
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

TRAIN = ["--model", "phi-tiny", "--lr", "2e-3", "--warmup-steps", "10", "--lr-schedule", "wsd",
         "--eval-interval", "50", "--eval-batches", "4", "--checkpoint-interval", "1000", "--device", "cpu"]
SIZES = ["64x32", "128x16", "256x8", "512x4", "1024x2"]
"""A block beyond phi-tiny's 512 positions widens its context (its rotary table: no position is learned)."""


def scratchlm(*args: str, capture: bool = False) -> str:
    r = subprocess.run([sys.executable, "-m", "scratchlm", *args], check=True, text=True,
                       stdout=subprocess.PIPE if capture else None)
    return r.stdout if capture else ""


def train(out: Path, data: str, seed: int, steps: int, size: str, *extra: str) -> None:
    if (out / "summary.json").exists():
        return
    block, batch = size.split("x")
    scratchlm("train", "--data", data, "--out", str(out), "--seed", str(seed), "--max-steps", str(steps),
              "--block-size", block, "--micro-batch-size", batch, "--resume", "auto", *TRAIN, *extra)


def held_out_loss(run: Path, corpus: str, *flags: str, cache: str = "held_out_eval.json",
                  block_size: int = 256) -> float:
    """`scratchlm eval` on the corpus's held-out documents, or as ``flags`` say (cached beside the run)."""
    cached = run / cache
    if not cached.exists():
        cached.write_text(scratchlm("eval", "--model", str(run / "final"), "--data", corpus, "--block-size",
                                    str(block_size), "--device", "cpu", "--json", *flags, capture=True))
    return json.loads(cached.read_text())["loss"]


def feed_run(out: Path, corpus: str, seed: int, steps: int, size: str, flags: list[str]) -> None:
    if (out / "summary.json").exists():
        return
    port = free_port()
    server = spawn(corpus, port, "--seed", str(seed))
    try:
        train(out, f"http://127.0.0.1:{port}", seed, steps, size, *flags)
    finally:
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--out", default="runs/fairness")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", nargs="+", default=SIZES, help="BLOCKxBATCH settings")
    p.add_argument("--feed-flags", nargs=argparse.REMAINDER, default=[],
                   help="train flags of the feed runs (the rest of the line), e.g. --feed-shuffle-tokens 0; "
                        "their runs are named after them")
    args = p.parse_args()
    out = Path(args.out)
    tag = "".join(f.strip("-").replace("feed-shuffle-", "") for f in args.feed_flags)
    rows, table = [], {}
    for size in args.sizes:
        block = int(size.split("x")[0])
        losses: dict[str, list[float]] = {"corpus": [], "feed": []}
        for seed in args.seeds:
            corpus_run, feed = out / f"corpus-{size}-s{seed}", out / f"feed{tag}-{size}-s{seed}"
            train(corpus_run, args.corpus, seed, args.steps, size)
            feed_run(feed, args.corpus, seed, args.steps, size, args.feed_flags)
            for kind, run in (("corpus", corpus_run), ("feed", feed)):
                loss = held_out_loss(run, args.corpus, block_size=block)
                losses[kind].append(loss)
                rows.append((size, kind, seed, loss))
        gap = statistics.mean(losses["feed"]) - statistics.mean(losses["corpus"])
        spread = {k: max(v) - min(v) for k, v in losses.items()}
        allowed = max(0.03, spread["corpus"])
        table[size] = {"losses": losses, "gap": gap, "spread": spread, "allowed": allowed,
                       "pass": abs(gap) <= allowed}

    print(f"\n{'size':>8} {'data':<7} {'seed':>4} {'held-out loss':>13}")
    for size, kind, seed, loss in rows:
        print(f"{size:>8} {kind:<7} {seed:>4} {loss:>13.4f}")
    print(f"\n{'size':>8} {'corpus mean':>11} {'spread':>7} {'feed mean':>9} {'spread':>7} {'gap':>8} "
          f"{'allowed':>8}")
    for size, t in table.items():
        print(f"{size:>8} {statistics.mean(t['losses']['corpus']):>11.4f} {t['spread']['corpus']:>7.4f} "
              f"{statistics.mean(t['losses']['feed']):>9.4f} {t['spread']['feed']:>7.4f} {t['gap']:>+8.4f} "
              f"{t['allowed']:>8.4f} {'PASS' if t['pass'] else 'FAIL'}")
    (out / f"fairness{tag}.json").write_text(json.dumps({"steps": args.steps, "feed_flags": args.feed_flags,
                                                         "sizes": table}, indent=1))


if __name__ == "__main__":
    main()
