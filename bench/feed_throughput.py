"""Feed throughput on loopback: MB/s and texts/s served to 1, 4 and 16 concurrent clients, and the trainer's
loader rate (tokens/s: the feed tokenizes, the loader cuts blocks and draws them from its shuffle buffer), on
the real corpus and the real tokenizer.

    python bench/feed_throughput.py --corpus $SCRATCHLM_DATA --seconds 10

The server runs as a separate process (``scratchlm serve``) so the clients do not share its interpreter.
"""

from __future__ import annotations

import argparse
import os
import time

from feed_load import hammer, spawn  # the same load loop and server launcher as bench/feed_load.py

from scratchlm.serving import free_port


def loader_rate(url: str, seconds: float, shuffle_blocks: int) -> float:
    from scratchlm.data.reading import FeedReading
    from scratchlm.data.remote import FeedBlockLoader, FeedClient

    loader = FeedBlockLoader(FeedClient(url), 2048, 8, 1337,
                             FeedReading(feed_texts_per_request=64, feed_shuffle_blocks=shuffle_blocks), 0)
    batches = iter(loader)
    next(batches)  # warm-up: connection, the buffer filled, tokenizer threads
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(batches)
        tokens += b.inputs.numel() + b.inputs.shape[0]
    batches.close()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", type=int, default=64, help="texts per request")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = spawn(args.corpus, port)
    try:
        hammer(url, 4, 2.0, args.size)  # warm-up
        print(f"{'clients':>7} {'MB/s':>8} {'texts/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for clients in (1, 4, 16):
            r = hammer(url, clients, args.seconds, args.size)
            print(f"{r['clients']:>7} {r['MB_per_s']:>8.1f} {r['texts_per_s']:>9,.0f} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f} "
                  f"{r['errors']:>6}", flush=True)
        for blocks in (0, 1024):
            rate = loader_rate(url, args.seconds, blocks)
            print(f"trainer's loader, shuffle buffer of {blocks} blocks: {rate:,.0f} tokens/s (blocks of "
                  "2049, batch 8; the feed tokenizes)", flush=True)
    finally:
        server.kill()


if __name__ == "__main__":
    main()
