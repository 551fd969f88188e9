"""The model-size ladder: four sizes trained on the clean corpus, fitted as L(N, D), and asked about Phi-2.

    python bench/ladder.py [--out runs/ladder] [--steps 200] [--long 4]

Every size trains one constant-rate run with wsd's warmup; the wsd runs are decays branched off it
(``--resume-from CKPT --decay-steps N``: a wsd run of T steps is the constant run to 0.8·T and a decay over
0.2·T), at T = steps/2 and T = steps for every size, and for the largest also at T = long·steps (its constant
run goes on that far): the longer run the 4x backtest predicts. Then ``scratchlm report`` reads every run,
fits L(N, D) with N counted both ways, backtests the largest size from the smaller ones, and answers for
Phi-2. Resumable: a finished run is kept, an interrupted one continues from its newest checkpoint. Runs
alone on the machine (it is an hour of both cores); no timing is read from it, only losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scratchlm.reporting.ladder import PACKAGED

SIZES = ("phi-d48", "phi-d64", "phi-d96", "phi-tiny")
# One setting for every size (the forecast check's, bench/RESULTS.md): same data order, same tokens per step,
# so the law's areas, counted in steps, mean the same tokens for every size.
COMMON = ["--lr", "3e-3", "--warmup-steps", "10", "--micro-batch-size", "8", "--block-size", "256",
          "--eval-batches", "8", "--seed", "1", "--log-interval", "20"]


def _train(out: Path, args: list[str]) -> None:
    if (out / "summary.json").exists():
        print(f"kept {out.name} (finished)")
        return
    print(f"training {out.name}: scratchlm train {' '.join(args)}", flush=True)
    command = [sys.executable, "-m", "scratchlm", "train", "--out", str(out), "--resume", "auto"]
    subprocess.run([*command, *COMMON, *args], check=True)


def _size(root: Path, model: str, lengths: list[int]) -> None:
    """The constant run of ``model`` to 0.8 of the longest length, then a wsd decay branched per length."""
    starts = [int(0.8 * t) for t in lengths]
    const = root / f"{model}-const"
    _train(const, ["--model", model, "--lr-schedule", "constant", "--max-steps", str(max(starts)),
                   "--checkpoint-interval", str(min(starts)), "--keep-checkpoints", "1000",
                   "--eval-interval", "20"])
    for length, start in zip(lengths, starts, strict=True):
        decay = length - start
        _train(root / f"{model}-wsd{length}",
               ["--model", model, "--resume-from", str(const / "checkpoints" / f"step-{start:08d}"),
                "--decay-steps", str(decay), "--eval-interval", str(max(5, decay // 4))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ladder"))
    parser.add_argument("--steps", type=int, default=200, help="the wsd length every size is trained to")
    parser.add_argument("--long", type=int, default=4, help="the largest size's longer run, in multiples")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="presets, smallest first")
    parser.add_argument("--package", action="store_true",
                        help="also write the ladder into the package (the demo's report reads its floors)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.sizes:
        longer = [args.long * args.steps] if model == args.sizes[-1] else []
        lengths = [args.steps // 2, args.steps, *longer]
        _size(args.out, model, lengths)
    runs = sorted(p for p in args.out.iterdir() if (p / "summary.json").exists())
    report = args.out / "report"
    subprocess.run([sys.executable, "-m", "scratchlm", "report", *map(str, runs), "--out", str(report),
                    "--predict-model", "phi-2", "--predict-tokens", "1.4e12", "--reference-loss", "2.273",
                    "--reference-name", "Phi-2 (published WikiText-2 loss)"], check=True)
    if not (report / "ladder.json").exists():  # too few evaluations, sizes or steps: the report says which
        reasons = [f.get("error", "no ladder") for f in json.loads((report / "report.json").read_text())
                   ["forecasts"].values()]
        sys.exit(f"no ladder from these runs ({'; '.join(reasons)}); see {report / 'report.md'}")
    saved = json.loads((report / "ladder.json").read_text())
    saved["source"] = (f"the ladder of bench/ladder.py ({', '.join(args.sizes)}, {args.steps} steps, "
                       f"{time.strftime('%Y-%m-%d')}) on {Path(os.environ.get('SCRATCHLM_DATA', '?')).name}")
    (report / "ladder.json").write_text(json.dumps(saved, indent=2))
    if args.package:
        PACKAGED.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote {PACKAGED}: the floors the demo's report reads")
    text = (report / "report.md").read_text()
    print(text[text.index("### The model-size ladder"):])


if __name__ == "__main__":
    main()
