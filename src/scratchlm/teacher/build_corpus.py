"""``scratchlm build-corpus``: generate a clean corpus with a teacher and store it as the seed's
``sample.zip``.

Texts are written one file each into ``OUT.parts/`` (temporary name, then rename), so an interrupted run loses
at most the batch in flight; running the same command again continues from what is there. When the size is
reached, the parts are packed into ``OUT`` (written to a temporary file, then renamed) and a summary is
written beside it. Exact duplicates are never stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from collections import deque
from pathlib import Path

from tqdm import tqdm

from ..config import ConfigError
from ..files import atomic_file, atomic_write
from .diversity import DiversityMeter
from .prompts import PromptSource
from .sampling import SamplingParams

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'100MB' → 100,000,000 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, or a plain number of bytes)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError(f"size {text!r}: use a number with an optional unit, e.g. 100MB or 512KiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def _key(text: str) -> str:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).hexdigest()


def build_corpus(teacher, out: Path, size_bytes: int, prompts: PromptSource, params: SamplingParams,
                 batch_size: int, seed: int = 0, progress: bool = True) -> dict:
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    state_path = parts / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"generated": 0, "tokens": 0,
                                                                           "duplicates_dropped": 0}
    for stale in parts.glob("*.tmp"):
        stale.unlink()
    stored = sorted(parts.glob("*.txt"))
    seen, meter, total = set(), DiversityMeter(), 0
    for path in stored:
        text = path.read_text(encoding="utf-8")
        seen.add(_key(text))
        meter.add(text)
        total += len(text.encode("utf-8"))
    next_index = int(stored[-1].stem) + 1 if stored else 0
    bar = tqdm(total=size_bytes, initial=min(total, size_bytes), unit="B", unit_scale=True,
               desc="building corpus", disable=not progress or None)
    # Two batches in flight, so a local engine's slots never wait while a batch's texts are being stored.
    # Seeds move on with the texts generated so far: a restarted run does not redo the same prompts.
    in_flight: deque = deque()
    next_seed = seed + state["generated"]
    while total < size_bytes:
        while len(in_flight) < 2:
            in_flight.append(teacher.submit(prompts.sample(batch_size), params, seed=next_seed))
            next_seed += batch_size
        for c in in_flight.popleft().result():
            text = c.text.strip()
            state["generated"] += 1
            state["tokens"] += c.tokens
            if not text:
                continue
            meter.add(text)
            key = _key(text)
            if key in seen:
                state["duplicates_dropped"] += 1
                continue
            seen.add(key)
            atomic_write(parts / f"{next_index:08d}.txt", text, fsync=False)
            next_index += 1
            n = len(text.encode("utf-8"))
            total += n
            bar.update(n)
        atomic_write(state_path, json.dumps(state), fsync=False)
    bar.close()
    for extra in in_flight:  # the batch beyond the size asked for
        extra.cancel()

    with atomic_file(out) as tmp_zip, zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted(parts.glob("*.txt")):
            z.write(path, arcname=f"generated/{path.name}")
    summary = {"out": str(out), "bytes": total, "texts": len(seen), "generated": state["generated"],
               "tokens_generated": state["tokens"], "exact_duplicates_dropped": state["duplicates_dropped"],
               "diversity": meter.summary()}
    atomic_write(out.with_name(out.name + ".summary.json"), json.dumps(summary, indent=2))
    shutil.rmtree(parts)
    return summary
