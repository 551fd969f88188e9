"""The CPU teacher against llama.cpp's server, as a user would compare them: the same trained model, converted
with llama.cpp's own converter, both servers on loopback, the same clients.

    python bench/llamacpp_compare.py --model runs/teacher/final --out runs/llamacpp

1. llama.cpp: the vendored source of a pinned `llama-cpp-python` sdist from PyPI (no other network), its
   `llama-server` built with cmake (once, kept under --out), and the model converted to GGUF (f32) by its
   `convert_hf_to_gguf.py`.
2. `llama-server -t <cores> --cont-batching --parallel 32` and `scratchlm serve-model` (its decoding step
   compiled, the default on a CPU), each started alone on loopback, one at a time, in alternated rounds.
3. Loads, --new-tokens each, temperature 0.8 and top-p 0.95: 32 clients × 1 request and 8 clients × 4
   requests in turn; llama.cpp at its default samplers (top-k 40, min-p 0.05) and at ours exactly (top-k 40,
   min-p 0), ours at top-k 40 and over the whole vocabulary. Tokens a second of wall time, medians of the
   rounds, the spread of ours.
4. Greedy agreement on 8 prompts.

Not part of the test suite. Alone on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx

from scratchlm.serving import free_port

LLAMA_CPP_PYTHON = "0.3.36"
PROMPTS = ["Once upon a time", "The history of the river", "In 1850 the city", "def main():\n    ",
           "The cat sat on", "Scientists have found", "She opened the door and", "Chapter one:"]
LOADS = {"32 x 1": (32, 1), "8 x 4": (8, 4)}
SETTINGS = {  # name → (server, extra request fields)
    "llama.cpp defaults": ("llama", {}),
    "llama.cpp like ours": ("llama", {"top_k": 40, "min_p": 0.0}),
    "ours, top-k 40": ("ours", {"top_k": 40}),
    "ours, whole vocabulary": ("ours", {}),
}


def fetch_sdist(out: Path) -> Path:
    """The pinned sdist, from PyPI's simple index (PEP 503), its sha256 checked against the index's. Not `pip
    download`: preparing an sdist's metadata builds its build requirements, cmake among them, from source."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    path = out / name
    if not path.exists():
        index = httpx.get("https://pypi.org/simple/llama-cpp-python/", timeout=60, follow_redirects=True)
        index.raise_for_status()
        link = re.search(rf'href="([^"#]*/{re.escape(name)})#sha256=([0-9a-f]{{64}})"', index.text)
        if link is None:
            raise RuntimeError(f"{name} is not in PyPI's index")
        url, sha256 = link.groups()
        body = httpx.get(url, timeout=600, follow_redirects=True).raise_for_status().content
        if hashlib.sha256(body).hexdigest() != sha256:
            raise RuntimeError(f"{name}: its sha256 is not the index's")
        path.write_bytes(body)
    return path


def build_llama_server(out: Path) -> tuple[Path, Path]:
    """llama-server and the llama.cpp source folder, built once from the pinned sdist."""
    source = out / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    server = source / "build" / "bin" / "llama-server"
    if server.exists():
        return server, source
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fetch_sdist(out)) as sdist:
        sdist.extractall(out, filter="data")
    subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["cmake", "--build", str(source / "build"), "--target", "llama-server", "-j",
                    str(os.cpu_count() or 2)], check=True)
    return server, source


def convert(model: Path, source: Path, out: Path) -> Path:
    """The model as GGUF (f32), by llama.cpp's converter (its own gguf-py on the path)."""
    gguf = out / "model-f32.gguf"
    if not gguf.exists():
        env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
                        "--outfile", str(gguf)], check=True, env=env)
    return gguf


def start(kind: str, model: Path, gguf: Path, server: Path, context: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    threads = str(os.cpu_count() or 2)
    if kind == "llama":
        command = [str(server), "-m", str(gguf), "-t", threads, "-tb", threads, "--cont-batching",
                   "--parallel", "32", "-c", str(32 * context), "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [sys.executable, "-m", "scratchlm", "serve-model", "--model", str(model), "--port",
                   str(port), "--device", "cpu", "--batch-size", "32"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{kind} server did not start: {' '.join(command)}")
        time.sleep(0.5)


def load(url: str, clients: int, requests: int, new_tokens: int, extra: dict) -> float:
    """Completion tokens a second of wall time: ``clients`` threads, each sending ``requests`` requests one
    after another (one prompt each: llama.cpp takes one a request)."""
    counts: list[int] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": new_tokens,
                        "temperature": 0.8, "top_p": 0.95, "seed": 1000 * c + r, **extra}
                answer = http.post(url + "/v1/completions", json=body).json()
                counts.append(answer["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def greedy(url: str, new_tokens: int) -> list[str]:
    with httpx.Client(timeout=600) as http:
        return [http.post(url + "/v1/completions", json={"prompt": p, "max_tokens": new_tokens,
                                                        "temperature": 0}).json()["choices"][0]["text"]
                for p in PROMPTS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained model folder (Hugging Face format, ours)")
    p.add_argument("--out", default="runs/llamacpp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    out, model = Path(args.out), Path(args.model)
    server, source = build_llama_server(out)
    gguf = convert(model, source, out)
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    rates: dict[tuple[str, str], list[float]] = {}
    texts = {}
    for r in range(args.rounds):
        for kind in ("llama", "ours") if r % 2 == 0 else ("ours", "llama"):  # alternated
            proc, url = start(kind, model, gguf, server, context)
            try:
                load(url, 4, 1, 16, {})  # warm-up
                for name, (who, extra) in SETTINGS.items():
                    if who != kind:
                        continue
                    for label, (clients, requests) in LOADS.items():
                        rate = load(url, clients, requests, args.new_tokens, extra)
                        rates.setdefault((name, label), []).append(rate)
                        print(f"round {r + 1} {name:<24} {label}: {rate:,.0f} tokens/s", flush=True)
                if r == 0:
                    texts[kind] = greedy(url, 32)
            finally:
                proc.kill()
                proc.wait()
    table = {f"{name} | {label}": {"median": statistics.median(v), "runs": v}
             for (name, label), v in rates.items()}
    print(f"\n{'clients':<8} " + " ".join(f"{n:>24}" for n in SETTINGS)
          + f" {'ours top-k 40 / llama.cpp':>26}")
    for label in LOADS:
        medians = [statistics.median(rates[(n, label)]) for n in SETTINGS]
        ours = rates[("ours, top-k 40", label)]
        spread = (max(ours) - min(ours)) / statistics.median(ours)
        print(f"{label:<8} " + " ".join(f"{m:>24,.0f}" for m in medians)
              + f" {medians[2] / medians[0]:>20.2f} (ours spread {spread:.0%})")
    agree = sum(a == b for a, b in zip(texts["llama"], texts["ours"], strict=True))
    print(f"greedy: {agree} of {len(PROMPTS)} prompts give the same 32 tokens' text")
    (out / "compare.json").write_text(json.dumps({"rates": table, "greedy_equal": agree}, indent=1))
    shutil.rmtree(out / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
