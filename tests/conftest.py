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


# pytest-xdist hands out whole files (``--dist loadfile``) in the order collected (``pytest_configure`` turns
# off its own order, by count of tests): longest first, so that the two workers finish together rather than
# one running a long file alone at the end (measured: one worker idle for 110 s of a 545 s run). Seconds per
# file, one worker each on the 2-core machine; a file not listed counts as short. Only the order depends on
# these numbers.
FILE_SECONDS = {
    "training/test_train.py": 170, "test_demo.py": 125, "data/test_prepare.py": 80,
    "feed/test_feed_teachers.py": 65, "training/test_distill.py": 65, "test_evaluation.py": 60,
    "data/test_data_scale.py": 55, "feed/test_feed.py": 50, "teacher/test_teacher.py": 50,
    "test_readme.py": 50, "training/test_checkpoint.py": 35, "data/test_caches.py": 35,
    "test_cli.py": 30, "training/test_tracking.py": 25, "test_config.py": 20,
    "test_serving.py": 35, "teacher/test_engine.py": 40, "report/test_report.py": 10,
    "teacher/test_serve_model.py": 5, "report/test_forecast.py": 5, "data/test_data.py": 5,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist is there (pytest -p no:xdist runs without it)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """The longest files first (a stable sort: each file's tests stay together and in their order)."""
    tests = Path(__file__).parent
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.relative_to(tests).as_posix(), 0))


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
