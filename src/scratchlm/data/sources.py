"""Where training text comes from: a corpus path, a weighted list of corpora, a feed URL, or
$SCRATCHLM_DATA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .documents import DataError
from .hf_spec import HF_PREFIX

DATA_ENV = "SCRATCHLM_DATA"
"""The environment variable naming the default corpus of every command."""


def corpus_from_env(given: str | None, flag: str | None = None) -> str | None:
    """``given`` if set, else $SCRATCHLM_DATA. With ``flag`` (the command's option), having neither is a
    ``ConfigError`` that says what to pass or set; without it, None."""
    corpus = given or os.environ.get(DATA_ENV) or None
    if corpus is None and flag is not None:
        raise ConfigError(f"no corpus: pass {flag} PATH or set {DATA_ENV}")
    return corpus


def is_feed_url(spec: str) -> bool:
    """Whether a data setting names a feed server rather than a corpus."""
    return spec.startswith(("http://", "https://"))


@dataclass(frozen=True)
class DataSource:
    """One corpus of a training mix and its share of the training blocks."""

    path: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        if self.path.startswith(HF_PREFIX):
            return self.path.removeprefix(HF_PREFIX).replace("/", "_")
        return Path(self.path).name or self.path


def _weighted(item: str) -> bool:
    """Whether an item ends in ``:WEIGHT`` (a Hugging Face spec has colons of its own)."""
    head, _, tail = item.rpartition(":")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(head) and head != "hf"


def _item(item: str) -> DataSource:
    path, _, weight_text = item.rpartition(":")
    if not path or (item.startswith(HF_PREFIX) and not _weighted(item)):  # a corpus alone: weight 1
        path, weight_text = item, "1"
    try:
        weight = float(weight_text)
    except ValueError:
        raise DataError(f"data list item '{item}': the weight after ':' must be a number") from None
    if not weight > 0:
        raise DataError(f"data list item '{item}': the weight must be positive")
    if not path.startswith(HF_PREFIX) and not Path(path).expanduser().exists():
        raise DataError(f"data list item '{item}': corpus '{path}' does not exist")
    return DataSource(path, weight)


def parse_data_list(spec: str) -> list[DataSource]:
    """``PATH`` (one corpus) or ``PATH:WEIGHT,PATH:WEIGHT,...`` (a mix; a missing weight is 1; weights are
    relative). A string naming an existing file or folder is always that one corpus, commas or colons and
    all; ``hf:NAME[:CONFIG][@SPLIT]`` names a Hugging Face dataset."""
    if Path(spec).expanduser().exists() or "," not in spec and ":" not in spec:
        return [DataSource(spec)]
    if "," not in spec and spec.startswith(HF_PREFIX) and not _weighted(spec):
        return [DataSource(spec)]
    sources = [_item(item.strip()) for item in spec.split(",")]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):  # they label the per-source evaluation losses
        raise DataError(f"data list: two sources are named alike ({', '.join(names)}); rename one")
    return sources

