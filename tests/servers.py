"""Real servers on loopback for the tests (and the feed benchmarks): the package's own BackgroundServer
(uvicorn in a thread), or ``scratchlm serve`` as a process of its own that a test can kill."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from scratchlm.serving import BackgroundServer, free_port

UvicornThread = BackgroundServer


def spawn(corpus: str, port: int, *flags: str, timeout_s: float = 120.0) -> subprocess.Popen:
    """Start ``scratchlm serve`` on loopback and return the process once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--corpus", str(corpus), "--port",
                             str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"feed server on port {port} did not start")
        time.sleep(0.2)


__all__ = ["UvicornThread", "free_port", "spawn"]
