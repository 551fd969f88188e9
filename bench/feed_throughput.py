"""Feed throughput on loopback: MB/s and texts/s served to 1, 4 and 16 concurrent clients, and the client's
tokenize + pack rate (tokens/s), on the real corpus and the real tokenizer.

    python bench/feed_throughput.py --corpus $SCRATCHLM_DATA --seconds 10

The server runs as a separate process (``scratchlm serve``) so the clients do not share its interpreter.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, clients: int, seconds: float, size: int) -> dict:
    stop = time.monotonic() + seconds
    totals = {"bytes": 0, "texts": 0, "requests": 0, "errors": 0}
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(rank: int) -> None:
        cursor = None
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = http.get(url + "/v1/batch", params={"size": size, "rank": rank, "world_size": clients,
                                                        **({"cursor": cursor} if cursor else {})})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        totals["errors"] += 1
                        continue
                    body = r.json()
                    cursor = body["cursor"]
                    totals["bytes"] += sum(len(t.encode("utf-8")) for t in body["texts"])
                    totals["texts"] += len(body["texts"])
                    totals["requests"] += 1
                    latencies.append(dt)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "MB_s": totals["bytes"] / wall / 1e6, "texts_s": totals["texts"] / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "errors": totals["errors"]}


def tokenize_pack_rate(url: str, seconds: float) -> float:
    from scratchlm.feed.client import FeedBlockLoader, FeedClient
    from scratchlm.tokenizer import load_tokenizer

    loader = FeedBlockLoader(FeedClient(url), load_tokenizer(), block_size=2048, batch_size=8, texts_per_request=64)
    batches = iter(loader)
    next(batches)  # warm-up: connection, first requests, tokenizer threads
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(batches)
        tokens += b.inputs.numel() + b.inputs.shape[0]
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", type=int, default=64, help="texts per request")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--corpus", args.corpus, "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if time.monotonic() > deadline:
                sys.exit("server did not start")
        load(url, 4, 2.0, args.size)  # warm-up
        print(f"{'clients':>7} {'MB/s':>8} {'texts/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for clients in (1, 4, 16):
            r = load(url, clients, args.seconds, args.size)
            print(f"{r['clients']:>7} {r['MB_s']:>8.1f} {r['texts_s']:>9,.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                  f"{r['errors']:>6}", flush=True)
        rate = tokenize_pack_rate(url, args.seconds)
        print(f"client fetch + tokenize + pack: {rate:,.0f} tokens/s (blocks of 2049, batch 8)")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
