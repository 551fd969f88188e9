"""Data at the scale people pretrain on: a corpus of several GB, tokenized, served and trained on.

Writes a corpus of ``--gb`` GB on disk into a temporary folder (the shared corpus repeated, each copy's
documents numbered so that no two are equal) as parquet shards of ``--shard-gb`` GB (uncompressed, row groups
of 10,000 rows, as public sets come), jsonl.zst files and plain text files, then measures, each step a process
of its own (sampling the resident memory of it and its children):

1. tokenization in MB/s with 1 and with 2 processes on the same slice (a smaller corpus of the same mix,
   ``--slice-gb``), peak RSS, then the whole corpus with ``--num-proc`` processes (what 3. trains on);
2. ``scratchlm serve`` on the whole corpus: the first start (writing the text store) and a second start, RSS
   after start-up and after ``--load-s`` seconds of ``/v1/batch`` load, against the same on the shared corpus;
3. ``scratchlm train --max-steps 20`` on it: peak RSS and time to the first step.

The corpus and caches are deleted at the end. Alone on the machine (nothing else running)::

    python bench/data_scale.py --gb 5 > data_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from scratchlm.data import iter_documents
from scratchlm.serving import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from feed_load import hammer, rss_mib  # noqa: E402
from servers import spawn  # noqa: E402  (the tests' launcher of a feed server process)

GB = 10**9


def _copies(documents: list[str]):
    """The documents over and over, each copy's numbered: no two texts are equal."""
    copy = 0
    while True:
        for i, text in enumerate(documents):
            yield f"Copy {copy}, document {i}.\n\n{text}"
        copy += 1


def make_corpus(root: Path, documents: list[str], total_gb: float, shard_gb: float) -> dict:
    """About 55% of the bytes as parquet shards, 35% as text files of up to 100 MB, the rest as jsonl.zst
    files of up to 250 MB of JSON (before compression); returns bytes on disk by format."""
    texts, on_disk = _copies(documents), {"parquet": 0, "txt": 0, "jsonl.zst": 0}
    targets = {"parquet": 0.55 * total_gb * GB, "txt": 0.35 * total_gb * GB}
    k = 0
    while on_disk["parquet"] < targets["parquet"]:
        rows, size = [], 0
        while size < min(shard_gb * GB, targets["parquet"] - on_disk["parquet"] + 1):
            rows.append(next(texts))
            size += len(rows[-1].encode())
        path = root / f"web-{k:05d}.parquet"
        pq.write_table(pa.table({"text": rows}), path, row_group_size=10_000, compression="none")
        on_disk["parquet"] += path.stat().st_size
        k += 1
    (root / "books").mkdir()
    k = 0
    while on_disk["txt"] < targets["txt"]:
        path = root / "books" / f"part-{k:04d}.txt"
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < min(100 * 10**6, targets["txt"] - on_disk["txt"]):
                f.write(next(texts) + "\n\n")
        on_disk["txt"] += path.stat().st_size
        k += 1
    (root / "chat").mkdir()
    k = 0
    while sum(on_disk.values()) < total_gb * GB:
        path = root / "chat" / f"part-{k:04d}.jsonl.zst"
        with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as f:
            written, budget = 0, min(250 * 10**6, 4 * (total_gb * GB - sum(on_disk.values())))
            while written < budget:
                line = (json.dumps({"text": next(texts)}) + "\n").encode()
                f.write(line)
                written += len(line)
        on_disk["jsonl.zst"] += path.stat().st_size
        k += 1
    return on_disk


def _tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_mib(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_measured(cmd: list[str], env: dict | None = None, first_line_with: str | None = None,
                 watch: Path | None = None) -> dict:
    """Run ``cmd`` to the end, sampling its process tree's RSS; with ``watch``/``first_line_with``, also the
    seconds until that file first holds a line containing that text."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    peak, first = 0.0, None
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mib(proc.pid))
        if first is None and watch is not None and watch.exists() and first_line_with in watch.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.2)
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{''.join(output)[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak, "first_seconds": first,
            "output_tail": "".join(output)[-400:]}


_TOKENIZE = """
import sys
from scratchlm.data import tokenize_corpus
from scratchlm.tokenizer import load_tokenizer
corpus = tokenize_corpus(sys.argv[1], load_tokenizer(), cache_dir=sys.argv[2], num_proc=int(sys.argv[3]))
print("train tokens", len(corpus.train), "bytes", corpus.stats["bytes"])
"""


def tokenize(corpus: Path, cache: Path, num_proc: int) -> dict:
    result = run_measured([sys.executable, "-c", _TOKENIZE, str(corpus), str(cache), str(num_proc)])
    text_bytes = int(result["output_tail"].split()[-1])
    return {"num_proc": num_proc, "text_MB": text_bytes / 1e6, "seconds": round(result["seconds"], 1),
            "MB_per_s": text_bytes / 1e6 / result["seconds"], "peak_rss_mib": round(result["peak_rss_mib"])}


def serve(corpus: Path, clients: int, load_s: float) -> dict:
    """Start a feed server twice (the first start writes the text store) and load the second."""
    out = {}
    for start in ("first_start", "second_start"):
        port, t0 = free_port(), time.perf_counter()
        server = spawn(str(corpus), port, timeout_s=3 * 3600)
        out[f"{start}_s"] = round(time.perf_counter() - t0, 1)
        if start == "first_start":
            server.kill()
            server.wait()
            continue
        try:
            out["rss_after_start_mib"] = round(rss_mib(server.pid))
            load = hammer(f"http://127.0.0.1:{port}", clients, load_s)
            out["rss_after_load_mib"] = round(rss_mib(server.pid))
            out["load"] = {k: load[k] for k in ("requests", "errors", "texts_per_s", "MB_per_s", "p50_ms")}
        finally:
            server.kill()
            server.wait()
    return out


def train(corpus: Path, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "scratchlm", "train", "--data", str(corpus), "--model", "phi-tiny",
           "--out", str(run_dir), "--max-steps", "20", "--eval-interval", "20", "--checkpoint-interval", "20"]
    result = run_measured(cmd, watch=run_dir / "metrics.jsonl", first_line_with='"step"')
    return {"seconds": round(result["seconds"], 1), "time_to_first_step_s": result["first_seconds"],
            "peak_rss_mib": round(result["peak_rss_mib"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=5.0, help="size of the corpus on disk")
    p.add_argument("--shard-gb", type=float, default=1.5, help="size of a parquet shard")
    p.add_argument("--slice-gb", type=float, default=0.5, help="text tokenized by 1 and by 2 processes")
    p.add_argument("--num-proc", type=int, default=os.cpu_count())
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--load-s", type=float, default=60.0)
    p.add_argument("--small-corpus", default=os.environ.get("SCRATCHLM_DATA"))
    p.add_argument("--workdir", default=None,
                   help="where the corpus is written (default: a temporary folder)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scratchlm-data-scale-", dir=args.workdir))
    os.environ["SCRATCHLM_CACHE"] = str(work / "cache")  # the servers and trainer started below use it
    result: dict = {"machine": {"cpus": os.cpu_count()}, "args": vars(args)}
    try:
        documents = [t for _, t in iter_documents(args.small_corpus)]
        t0 = time.perf_counter()
        corpus = work / "corpus"
        corpus.mkdir()
        result["corpus_bytes_on_disk"] = make_corpus(corpus, documents, args.gb, args.shard_gb)
        result["corpus_write_s"] = round(time.perf_counter() - t0, 1)
        slice_dir = work / "slice"
        slice_dir.mkdir()
        make_corpus(slice_dir, documents[::-1], args.slice_gb, args.slice_gb)  # its own texts: no cache hits
        result["tokenize_slice"] = [tokenize(slice_dir, work / f"slice-cache-{n}", n) for n in (1, 2)]
        result["tokenize_speedup_2_over_1"] = (result["tokenize_slice"][1]["MB_per_s"]
                                              / result["tokenize_slice"][0]["MB_per_s"])
        shutil.rmtree(slice_dir)
        result["tokenize_corpus"] = tokenize(corpus, work / "cache", args.num_proc)
        print(json.dumps(result, indent=1), file=sys.stderr, flush=True)
        result["serve_small"] = serve(Path(args.small_corpus), args.clients, args.load_s)
        result["serve_large"] = serve(corpus, args.clients, args.load_s)
        result["serve_rss_ratio_large_over_small"] = (result["serve_large"]["rss_after_load_mib"]
                                                     / result["serve_small"]["rss_after_load_mib"])
        result["train"] = train(corpus, work / "run")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
