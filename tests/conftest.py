"""Shared fixtures: the real tokenizer and corpus from ../shared (through SCRATCHLM_TOKENIZER and
SCRATCHLM_DATA)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("SCRATCHLM_TOKENIZER", str(SHARED / "tokenizers" / "phi-2"))
os.environ.setdefault("SCRATCHLM_DATA", str(SHARED / "data" / "clean"))


# Under pytest-xdist (``-n 2``: the README's test command), each worker's torch takes one core: two workers
# whose OpenMP teams wanted both cores would each wait on threads the other has descheduled, many times
# slower. Set before the tests import torch, and inherited by the processes they start.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> Path:
    """One token cache for the whole session, so each corpus is tokenized once (shared by xdist's workers:
    the cache's build lock lets one tokenize while the other waits)."""
    if XDIST_WORKER:
        path = tmp_path_factory.getbasetemp().parent / "token-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("token-cache")
    os.environ["SCRATCHLM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from scratchlm.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    path = Path(os.environ["SCRATCHLM_DATA"])
    if not path.is_dir():
        pytest.fail(f"SCRATCHLM_DATA={path} is not a folder: point it at shared/data/clean")
    return path


@pytest.fixture(scope="session")
def small_corpus(corpus_dir, tmp_path_factory) -> Path:
    """Two real books from the corpus (about 1 MB): enough for short runs, quick to tokenize."""
    out = tmp_path_factory.mktemp("small-corpus")
    for name in ("pg11_alices_adventures_in_wonderland.txt", "pg1342_pride_and_prejudice.txt"):
        shutil.copyfile(corpus_dir / "books" / name, out / name)
    return out


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, tokenizer) -> Path:
    """A random model with Phi-2's vocabulary and a context of 64 positions: small, so that a server answers
    every request in a moment."""
    from servers import random_model_folder

    from scratchlm.model.config import ModelConfig

    config = ModelConfig(name="small-context", n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                         block_size=64)
    return random_model_folder(tmp_path_factory.mktemp("models") / "small-context", config, tokenizer)
