"""The teacher's commands ``generate`` and ``build-corpus``, each a typed config and a run function (heavy
imports wait until a command runs); ``serve-model``'s config lives beside its server, in ``serve_model``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ..config import Count, DeviceSpec
from .prompts import PromptStrategy
from .settings import Sampling


class SeededSampling(Sampling):
    """The sampling settings and the seed of a command that samples."""

    seed: int = 0
    """Seed of the sampling."""

    def params(self):
        from .sampling import SamplingParams

        return SamplingParams(**self.part(Sampling).model_dump())


class GenerateConfig(SeededSampling):
    """Sample text from a model: a quick look at what it writes."""

    model: str
    """Hugging Face folder or hub id (ours or microsoft/phi-2)."""
    prompt: str = ""
    """Text to continue."""
    num_samples: Count = 1
    """Samples, generated as one batch."""
    device: DeviceSpec = "auto"
    """auto, cpu, cuda or cuda:N."""


def run_generate(cfg: GenerateConfig) -> None:
    from .backends import LocalTeacher

    teacher = LocalTeacher(cfg.model, device=cfg.device, batch_size=max(1, cfg.num_samples))
    outs = teacher.complete([cfg.prompt] * cfg.num_samples, cfg.params(), cfg.seed)
    for i, c in enumerate(outs):
        print(f"--- sample {i + 1} ({c.tokens} tokens{', stopped at <|endoftext|>' if c.finished else ''})")
        print(cfg.prompt + c.text)


class BuildCorpusConfig(SeededSampling):
    """Generate a clean corpus with a teacher and store it as the seed's sample.zip format."""

    teacher: str
    """local:PATH_OR_HUB_ID or openai:URL[#model]."""
    size: str
    """Bytes of text to generate, e.g. 100MB."""
    out: str
    """The .zip to write (rerun the same command to continue an interrupted build)."""
    prompts: list[PromptStrategy] = ["words", "topic", "snippet"]
    """Prompt strategies, mixed: token (the seed's), words, topic, snippet."""
    prompt_corpus: str | None = None
    """Corpus for word and snippet prompts (default: $SCRATCHLM_DATA)."""
    batch_size: Count = 64
    """Prompts per teacher call."""
    api_key_file: str | None = None
    """The openai teacher's API key file (else $SCRATCHLM_API_KEY)."""
    device: DeviceSpec = "auto"
    """auto, cpu, cuda or cuda:N (a local teacher)."""


def run_build_corpus(cfg: BuildCorpusConfig) -> None:
    from ..data import corpus_from_env, iter_documents
    from ..tokenizer import load_tokenizer
    from .backends import load_teacher
    from .build_corpus import build_corpus, parse_size
    from .prompts import PromptSource

    size = parse_size(cfg.size)
    teacher = load_teacher(cfg.teacher, cfg.api_key_file, cfg.device, cfg.batch_size)
    corpus = corpus_from_env(cfg.prompt_corpus)
    needs_documents = {"words", "snippet"} & set(cfg.prompts)
    # The prompts draw on a sample of the corpus: its first 10,000 documents are plenty and bound the memory.
    found = iter_documents(corpus) if corpus and needs_documents else iter(())
    documents = [text for _, text in itertools.islice(found, 10_000)]
    tokenizer = load_tokenizer() if "token" in cfg.prompts else None
    prompts = PromptSource(cfg.prompts, documents, seed=cfg.seed,
                           decode=tokenizer.decode if tokenizer else None)
    summary = build_corpus(teacher, Path(cfg.out), size, prompts, cfg.params(), cfg.batch_size, cfg.seed)
    print(json.dumps(summary, indent=2))
