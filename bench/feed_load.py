"""Load on the feed server: N concurrent clients asking /v1/batch for T seconds, on loopback.

Reports requests, errors, p50/p99 latency, throughput and how much the server's memory grew (it should not:
the buffers have caps). The server is a separate process, so its memory is its own.

    python bench/feed_load.py --corpus $SCRATCHLM_DATA --clients 32 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from scratchlm.serving import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import spawn  # noqa: E402  (the tests' launcher of a feed server process)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def hammer(url: str, clients: int, seconds: float, size: int = 16) -> dict:
    """``clients`` threads asking /v1/batch (each its own rank and cursor) for ``seconds``; totals and
    latencies."""
    latencies: list[float] = []
    totals = {"requests": 0, "errors": 0, "bytes": 0, "texts": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(rank: int) -> None:
        cursor = None
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = http.get(url + "/v1/batch", params={"size": size, "rank": rank, "world_size": clients,
                                                            **({"cursor": cursor} if cursor else {})})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    if not ok:
                        totals["errors"] += 1
                        continue
                    body = r.json()
                    cursor = body["cursor"]
                    totals["requests"] += 1
                    totals["texts"] += len(body["texts"])
                    totals["bytes"] += sum(len(t.encode("utf-8")) for t in body["texts"])
                    latencies.append(dt)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "seconds": round(wall, 1), "requests": totals["requests"],
            "errors": totals["errors"], "requests_per_s": totals["requests"] / wall,
            "texts_per_s": totals["texts"] / wall, "MB_per_s": totals["bytes"] / wall / 1e6,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None}


def run_load(corpus: str, clients: int = 32, seconds: float = 60.0, size: int = 16) -> dict:
    """A server process of its own, loaded by ``hammer``; adds how much its memory grew."""
    port = free_port()
    server = spawn(corpus, port)
    try:
        rss_start = rss_mib(server.pid)
        result = hammer(f"http://127.0.0.1:{port}", clients, seconds, size)
        rss_end = rss_mib(server.pid)
        return {**result, "server_rss_start_mib": rss_start, "server_rss_end_mib": rss_end,
                "rss_growth_mib": rss_end - rss_start}
    finally:
        server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    print(json.dumps(run_load(args.corpus, args.clients, args.seconds), indent=2))


if __name__ == "__main__":
    main()
