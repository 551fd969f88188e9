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


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> Path:
    """One token cache for the whole session, so each corpus is tokenized once."""
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
