"""The soft-label pipe, measured as it is used: what a teacher's top-k costs it to compute, what it costs on
the wire and through the feed, and what reading precomputed soft labels costs a training run's loader.

    python bench/soft_labels.py --models phi-tiny phi-20m --repeats 3

Alone on the machine (two jobs at once slow torch many times over on 2 cores). Every ratio compares two cases
measured in the same run, alternated, medians of ``--repeats``; each side warmed up at full size first.

1. The engine (random weights, fp32, batch 32): sampled generation (T 0.8, top-p 0.95, 256 new tokens) with
   and without ``logprobs`` 20; scoring (a prefill, no decoding) of 512-token sequences at k = 20.
2. The feed with ``--score-corpus`` and a local teacher: soft-labelled tokens a second reaching a reader of
   ``/v1/batch?tokens=1&soft_labels=20``, against the same engine's raw scoring; bytes a token on the wire.
3. A corpus prepared with ``scratchlm prepare --soft-labels 20``: the loader's tokens a second with and
   without its soft labels, and the data wait of a short training run that reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import FeedThread  # noqa: E402  (the real feed app on a loopback port)

from scratchlm.model.config import get_preset  # noqa: E402
from scratchlm.model.hf import save_hf  # noqa: E402
from scratchlm.model.model import Phi  # noqa: E402
from scratchlm.teacher.backends import LocalTeacher  # noqa: E402
from scratchlm.teacher.sampling import SamplingParams  # noqa: E402
from scratchlm.tokenizer import load_tokenizer  # noqa: E402

K = 20
HELD_OUT = 0.05


def teacher_folder(model: str, root: Path) -> Path:
    folder = root / model
    if not folder.exists():
        torch.manual_seed(0)
        save_hf(Phi(get_preset(model)), folder)
        load_tokenizer().save(folder)
    return folder


def timed(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def engine_rows(model: str, root: Path, repeats: int, batch: int = 32) -> dict:
    teacher = LocalTeacher(str(teacher_folder(model, root)), device="cpu", batch_size=batch,
                           dtype=torch.float32)
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 50000, (batch, 32)).tolist()
    sequences = rng.integers(100, 50000, (batch, 512)).tolist()
    sampled = SamplingParams(max_new_tokens=256, temperature=0.8, top_p=0.95, stop_at_eot=False)
    with_logprobs = SamplingParams(max_new_tokens=256, temperature=0.8, top_p=0.95, stop_at_eot=False,
                                   logprobs=K)
    cases = {
        "sampled": lambda: sum(c.tokens for c in teacher.complete(prompts, sampled, seed=0)),
        "sampled + logprobs 20": lambda: sum(c.tokens for c in teacher.complete(prompts, with_logprobs,
                                                                                seed=0)),
        "scoring k=20": lambda: sum(len(r) for r in teacher.score(sequences, K)),
    }
    for fn in cases.values():  # warm-up at full size
        fn()
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            rates[name].append(timed(fn))
    teacher.close()
    return {name: statistics.median(r) for name, r in rates.items()}


def feed_rows(corpus: str, root: Path, seconds: float, scoring_rate: float) -> dict:
    """A reader of soft-labelled token answers from a feed that scores its corpus with a local teacher."""
    from scratchlm.data.remote import FeedClient
    from scratchlm.feed.server import ServeConfig

    teacher = LocalTeacher(str(teacher_folder("phi-tiny", root)), device="cpu", batch_size=32,
                           dtype=torch.float32)
    cfg = ServeConfig(corpus=corpus, soft_labels=K, score_corpus=True)
    with FeedThread(cfg, teacher=teacher) as feed:
        client = FeedClient(feed.url)
        client.batch(16, None, soft_labels=K)  # warm-up
        labelled = total = sent = 0
        cursor, t0 = None, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            answer = client.batch(16, cursor, soft_labels=K)
            cursor = answer.meta.cursor
            labelled += int(answer.soft_mask.sum())
            total += len(answer.token_ids)
            sent += len(answer.to_bytes())
        rate = labelled / (time.perf_counter() - t0)
    teacher.close()
    return {"soft-labelled tokens/s through the feed": rate, "engine scoring tokens/s": scoring_rate,
            "ratio": rate / scoring_rate, "bytes per token on the wire": sent / total}


def short_books(corpus: str, root: Path) -> str:
    """Two short books of the corpus (about 120k tokens): a teacher scores them in a minute on the CPU."""
    folder = root / "short-books"
    folder.mkdir(exist_ok=True)
    for name in ("pg11_alices_adventures_in_wonderland.txt", "pg132_the_art_of_war.txt"):
        (folder / name).write_bytes((Path(corpus) / "books" / name).read_bytes())
    return str(folder)


def loader_rows(corpus: str, repeats: int, seconds: float) -> dict:
    """The corpus loader with and without prepared soft labels (a 1-layer teacher prepares them quickly:
    their values do not matter here, only reading them)."""
    from scratchlm.data.pipeline import DataRequest, build_data
    from scratchlm.data.reading import CorpusReading, SoftLabelReading
    from scratchlm.preparation import PrepareConfig, run_prepare

    small = teacher_folder("phi-tiny", Path(os.environ["SOFT_BENCH_ROOT"]))
    # a larger held-out share than the default, so that a small corpus keeps a held-out block (same in both)
    run_prepare(PrepareConfig(data=corpus, teacher=f"local:{small}", soft_labels=K, device="cpu",
                              eval_fraction=HELD_OUT))
    tokenizer = load_tokenizer()
    rates: dict[str, list[float]] = {"without": [], "with soft labels": []}
    for _ in range(repeats):
        for name, k in (("without", 0), ("with soft labels", K)):
            data = build_data(DataRequest(corpus, block_size=512, batch_size=8, eval_blocks=1, seed=1337,
                                          verify_cache=False, reading=CorpusReading(eval_fraction=HELD_OUT),
                                          soft=SoftLabelReading(soft_labels=k)),
                              tokenizer)
            next(data.batches)
            tokens, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                tokens += next(data.batches).inputs.numel()
            rates[name].append(tokens / (time.perf_counter() - t0))
            data.close()
    out = {name: statistics.median(r) for name, r in rates.items()}
    return {**out, "ratio": out["with soft labels"] / out["without"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["phi-tiny", "phi-20m"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--small-corpus", default=None,
                   help="corpus for the loader rows (default: two of its short books, scored in a minute)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soft-bench-"))
    os.environ["SOFT_BENCH_ROOT"] = str(root)
    results = {}
    for model in args.models:
        rows = engine_rows(model, root, args.repeats)
        rows["scoring / sampled per token"] = rows["scoring k=20"] / rows["sampled"]
        rows["sampled with / without logprobs 20"] = rows["sampled + logprobs 20"] / rows["sampled"]
        results[model] = rows
        print(model, json.dumps(rows, indent=1), flush=True)
    results["feed"] = feed_rows(args.corpus, root, args.seconds, results[args.models[0]]["scoring k=20"])
    print("feed", json.dumps(results["feed"], indent=1), flush=True)
    results["loader"] = loader_rows(args.small_corpus or short_books(args.corpus, root), args.repeats,
                                    args.seconds / 2)
    print("loader", json.dumps(results["loader"], indent=1), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
