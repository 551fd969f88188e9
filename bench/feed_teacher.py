"""The teacher's path to the feed: new tokens per second that reach the feed's teacher pool, against the same
engine's raw sampled throughput at the same batch size, in the same run; and serve-model under concurrent
clients against one client.

Rows (phi-tiny with random weights, fp32, the feed's sampling settings: 256 new tokens, temperature 0.8,
top-p 0.95):
- raw: ``GenerationEngine.generate`` on the feed's own prompts, 4 × batch of them at a time;
- local: a feed whose teacher is the same model in this process (``local:``);
- openai: a feed whose teacher is ``scratchlm serve-model`` over HTTP on loopback (``openai:``);
- serve-model: 8 concurrent clients of 4 prompts each against one client of 32 prompts.

    python bench/feed_teacher.py --batch 16 32 --seconds 40
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import FeedThread, UvicornThread  # noqa: E402  (real servers on loopback, as the tests use)

from scratchlm.data import iter_documents  # noqa: E402
from scratchlm.feed.server import ServeConfig  # noqa: E402
from scratchlm.model.config import get_preset  # noqa: E402
from scratchlm.model.hf import save_hf  # noqa: E402
from scratchlm.model.model import Phi  # noqa: E402
from scratchlm.teacher.backends import LocalTeacher  # noqa: E402
from scratchlm.teacher.prompts import PromptSource  # noqa: E402
from scratchlm.teacher.sampling import SamplingParams  # noqa: E402
from scratchlm.teacher.serve_model import create_app  # noqa: E402
from scratchlm.tokenizer import load_tokenizer  # noqa: E402

NEW_TOKENS, TEMPERATURE, TOP_P = 256, 0.8, 0.95


def model_folder(out: Path) -> str:
    torch.manual_seed(0)
    save_hf(Phi(get_preset("phi-tiny")), out)
    load_tokenizer().save(out)
    return str(out)


def raw_rate(teacher: LocalTeacher, prompts: PromptSource, batch: int, repeats: int) -> float:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P)
    rates = []
    for k in range(repeats + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        outs = teacher.complete(prompts.sample(4 * batch), params, seed=k)
        if k:
            rates.append(sum(c.tokens for c in outs) / (time.perf_counter() - t0))
    return statistics.median(rates)


def pool_rate(cfg: ServeConfig, teacher, seconds: float) -> float:
    """New tokens per second reaching the feed's teacher pool, in steady state: from a quarter of the window
    after the first texts arrived."""
    with FeedThread(cfg, teacher) as feed:
        pool = feed.feed.teachers
        while pool.tokens == 0:
            time.sleep(0.1)
        time.sleep(seconds / 4)
        tokens0, t0 = pool.tokens, time.perf_counter()
        time.sleep(seconds)
        return (pool.tokens - tokens0) / (time.perf_counter() - t0)


def serve_model_rates(url: str, prompts: PromptSource, repeats: int) -> tuple[float, float]:
    """(one client of 32 prompts, 8 concurrent clients of 4) in new tokens per second."""
    def post(http: httpx.Client, n: int, seed: int) -> int:
        body = {"prompt": prompts.sample(n), "max_tokens": NEW_TOKENS, "temperature": TEMPERATURE,
                "top_p": TOP_P, "seed": seed}
        return http.post(url + "/v1/completions", json=body).json()["usage"]["completion_tokens"]

    one, eight = [], []
    with httpx.Client(timeout=600) as http:
        post(http, 32, 0)  # warm-up
        for k in range(repeats):
            t0 = time.perf_counter()
            one.append(post(http, 32, k) / (time.perf_counter() - t0))
            counts: list[int] = []

            def client(seed: int, counts=counts) -> None:  # its own connection, as separate feeds' would be
                with httpx.Client(timeout=600) as own:
                    counts.append(post(own, 4, seed))

            clients = [threading.Thread(target=client, args=(s,)) for s in range(8)]
            t0 = time.perf_counter()
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            eight.append(sum(counts) / (time.perf_counter() - t0))
    return statistics.median(one), statistics.median(eight)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--seconds", type=float, default=40.0, help="window of each feed measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    args = p.parse_args()
    documents = iter_documents(args.corpus) if args.corpus else iter(())
    corpus_texts = [text for _, text in itertools.islice(documents, 2000)]  # for the prompts, as the feed
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(Path(tmp) / "phi-tiny")
        for batch in args.batch:
            teacher = LocalTeacher(folder, device="cpu", batch_size=batch, dtype=torch.float32)
            raw = raw_rate(teacher, PromptSource(documents=corpus_texts, seed=1), batch, args.repeats)
            cfg = ServeConfig(corpus=args.corpus, teacher_ratio=0.3, teacher_max_new_tokens=NEW_TOKENS,
                              teacher_buffer=100_000)
            local = pool_rate(cfg, teacher, args.seconds)
            with UvicornThread(create_app(teacher, "phi-tiny", None)) as server:
                remote = pool_rate(cfg.model_copy(update={"teacher": [f"openai:{server.url}"]}), None,
                                   args.seconds)
                one, eight = serve_model_rates(server.url, PromptSource(documents=corpus_texts, seed=2),
                                               args.repeats)
            teacher.close()
            print(f"RESULT feed-teacher phi-tiny fp32 b{batch} sampled: raw engine {raw:,.0f} tok/s; "
                  f"feed via local: {local:,.0f} tok/s ({local / raw:.2f}x raw); via openai: + serve-model "
                  f"{remote:,.0f} tok/s ({remote / raw:.2f}x raw); serve-model 8 clients x 4 prompts "
                  f"{eight:,.0f} tok/s vs 1 client x 32 {one:,.0f} tok/s ({eight / one:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
