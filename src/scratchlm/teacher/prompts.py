"""Prompts for diverse teacher text.

A single random token (the seed's way) makes a teacher repeat itself; TinyStories saw 59% of stories open the
same way. Strategies here, mixed by default:

- ``token``: one random token, as the seed did (kept for comparison).
- ``words``: a few random content words drawn from the corpus, to be worked into the text.
- ``topic``: a topic × audience × form template (Cosmopedia-style).
- ``snippet``: the opening of a random corpus document, to be continued.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Literal, get_args

PromptStrategy = Literal["token", "words", "topic", "snippet"]
STRATEGIES: tuple[str, ...] = get_args(PromptStrategy)

TOPICS = (
    "photosynthesis", "the French Revolution", "prime numbers", "how vaccines work", "plate tectonics",
    "the water cycle", "binary search", "supply and demand", "the Roman Empire", "black holes", "recursion",
    "the human heart", "volcanoes", "probability", "the printing press", "climate and weather",
    "electric circuits", "the immune system", "sorting algorithms", "ancient Egypt",
    "the theory of evolution", "linear equations", "coral reefs", "the industrial revolution",
    "Newton's laws of motion", "hash tables", "the moon's phases", "bees and pollination", "the Silk Road",
    "matrices", "sound waves", "the periodic table", "compound interest", "migratory birds",
    "the Renaissance", "graph theory", "glaciers", "the nervous system", "Python functions",
    "the solar system", "democracy in Athens", "fractions", "rainforests", "magnetism",
    "the scientific method",
)
AUDIENCES = ("a curious child", "a high-school student", "a university student", "a general reader",
             "an expert", "a programmer", "a teacher preparing a lesson")
FORMS = ("a textbook section", "a short story", "a blog post", "an encyclopedia entry",
         "a lecture transcript", "a dialogue between two friends", "a step-by-step tutorial", "a letter",
         "a news article", "a set of exercises with worked answers")
WORD = re.compile(r"[A-Za-z][a-z]{3,14}")


class PromptSource:
    """Seeded prompts from the chosen strategies; ``documents`` (corpus texts) feed ``words`` and
    ``snippet``."""

    def __init__(self, strategies: Sequence[str] = ("words", "topic", "snippet"),
                 documents: Sequence[str] = (),
                 vocab_size: int = 50257, seed: int = 0, decode=None) -> None:
        unknown = set(strategies) - set(STRATEGIES)
        if unknown or not strategies:
            raise ValueError(f"unknown prompt strategies {sorted(unknown)}; "
                             f"choose from {', '.join(STRATEGIES)}")
        needs_docs = {"words", "snippet"} & set(strategies)
        if needs_docs and not documents:
            strategies = [s for s in strategies if s not in needs_docs] or ["topic"]
        if "token" in strategies and decode is None:
            strategies = [s for s in strategies if s != "token"] or ["topic"]  # no tokenizer to decode with
        self.strategies, self.documents, self.decode = list(strategies), documents, decode  # any sequence
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self._words: list[str] | None = None

    def _word_pool(self) -> list[str]:
        if self._words is None:
            counts: dict[str, int] = {}
            for doc in self.rng.sample(self.documents, min(200, len(self.documents))):
                for w in WORD.findall(doc):
                    counts[w.lower()] = counts.get(w.lower(), 0) + 1
            pool = sorted(w for w, c in counts.items() if 2 <= c <= 200)
            self._words = pool or ["story", "river", "number"]
        return self._words

    def one(self) -> str:
        kind = self.rng.choice(self.strategies)
        if kind == "token":
            return self.decode([self.rng.randrange(1, self.vocab_size)])
        if kind == "words":
            words = self.rng.sample(self._word_pool(), 3)
            form = self.rng.choice(FORMS)
            return f"Write {form} that uses the words \"{words[0]}\", \"{words[1]}\" and \"{words[2]}\".\n\n"
        if kind == "topic":
            return (f"Write {self.rng.choice(FORMS)} about {self.rng.choice(TOPICS)} for "
                    f"{self.rng.choice(AUDIENCES)}.\n\n")
        doc = self.rng.choice(self.documents)
        words = doc.split()
        start = self.rng.randrange(0, max(1, len(words) - 40))
        return " ".join(words[start : start + self.rng.randint(12, 40)])

    def sample(self, n: int) -> list[str]:
        return [self.one() for _ in range(n)]
