"""The sampler's distribution, and the generation engine serving many callers at once, on a real small
model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from scratchlm.model.config import ModelConfig
from scratchlm.model.model import Phi
from scratchlm.teacher.engine import GenerationEngine
from scratchlm.teacher.sampling import UNIFORMS_PER_STEP, RowSettings, SamplingParams, sample

EOT = 3


def exact_distribution(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float) -> np.ndarray:
    """The reference: sort everything, keep the top k, then the tokens while the mass before them is below
    top_p."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    probs = np.exp(z[order] - z.max())
    if top_k:
        probs[top_k:] = 0.0
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    probs[before >= top_p] = 0.0
    out = np.zeros_like(probs)
    out[order] = probs / probs.sum()
    return out


@pytest.mark.parametrize("case,temperature,top_k,top_p", [
    ("peaked", 0.8, None, 0.95),  # a nucleus of a few dozen tokens: accepted in the first round or two
    ("flat", 1.0, None, 0.9),  # a nucleus of most of the vocabulary: the case a top-k shortcut cannot serve
    ("top-k", 0.7, 40, 0.8),
    ("sorted fallback", 0.8, None, 0.95),  # one rejection round only: every rejected row takes the sort path
])
def test_sampled_frequencies_match_the_exact_distribution(case, temperature, top_k, top_p, monkeypatch):
    if case == "sorted fallback":
        monkeypatch.setattr("scratchlm.teacher.sampling.ROUNDS", 1)
    rng = np.random.default_rng(0)
    vocab = 2000
    scale = 4.0 if case != "flat" else 0.3
    logits = rng.normal(0, scale, vocab).astype(np.float32)
    expected = exact_distribution(logits, temperature, top_k, top_p)
    rows, calls = 1000, 50
    batch = torch.from_numpy(np.tile(logits, (rows, 1)))
    settings = RowSettings.of([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * rows,
                              torch.device("cpu"))
    counts = np.zeros(vocab)
    for _ in range(calls):
        u = torch.from_numpy(rng.random((rows, UNIFORMS_PER_STEP)))
        np.add.at(counts, sample(batch, settings, u).numpy(), 1)
    n = rows * calls
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus (and the top k)
    inside = expected > 0
    z = (counts[inside] - n * expected[inside]) / np.sqrt(n * expected[inside] * (1 - expected[inside]))
    assert np.abs(z).max() < 5.5, (case, np.abs(z).max())  # within sampling error, token by token
    # ...and as a whole: Pearson's chi-square with k − 1 degrees of freedom (mean k − 1, sd √(2(k − 1))).
    chi2 = ((counts[inside] - n * expected[inside]) ** 2 / (n * expected[inside])).sum()
    k = inside.sum()
    assert chi2 < k - 1 + 6 * np.sqrt(2 * (k - 1)), (case, chi2, k)


def test_greedy_rows_and_sampled_rows_share_a_batch():
    logits = torch.randn(4, 50)
    settings = RowSettings.of([SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9)] * 2,
                              torch.device("cpu"))
    u = torch.rand(4, UNIFORMS_PER_STEP)
    tokens = sample(logits, settings, u)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.equal(sample(logits, settings, u), tokens)  # the same numbers, the same draws


TINY = ModelConfig(name="engine", vocab_size=300, padded_vocab_size=320, n_layer=2, n_embd=64, n_head=4,
                   intermediate_size=128, rotary_pct=0.5, block_size=128)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = Phi(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # sharp, varied predictions
    engine = GenerationEngine(model, EOT, batch_size=6, max_seq_len=96)
    yield engine
    engine.close()


def prompts_of(k: int) -> list[list[int]]:
    rng = np.random.default_rng(k)
    return [rng.integers(4, TINY.vocab_size, rng.integers(1, 12)).tolist() for _ in range(3)]


def test_requests_from_eight_threads_join_one_batch_and_match_running_alone(engine):
    greedy = SamplingParams(max_new_tokens=20, temperature=0, stop_at_eot=False)
    alone = [engine.generate(prompts_of(k), greedy) for k in range(8)]
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9)
    seeded_alone = engine.generate(prompts_of(99), seeded, seed=5)
    before = engine.stats.most_requests_in_a_step
    results: dict[int, list] = {}

    def caller(k: int) -> None:
        results[k] = engine.generate(prompts_of(k), greedy)
        if k == 3:
            results["seeded"] = engine.generate(prompts_of(99), seeded, seed=5)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[k] for k in range(8)] == alone  # each equal to the same request run alone
    assert results["seeded"] == seeded_alone  # a seeded sampled request: the same text in company
    assert before == 1 and engine.stats.most_requests_in_a_step > 1  # the batch really held several requests
    assert engine.generate(prompts_of(99), seeded, seed=6) != seeded_alone


def test_a_request_longer_than_the_context_is_refused_at_once(engine):
    with pytest.raises(ValueError, match="at most 95"):
        engine.submit([[5, 6]], SamplingParams(max_new_tokens=96))
    assert engine.generate([], SamplingParams(max_new_tokens=8)) == []


def test_a_small_request_is_not_held_behind_a_large_one(engine):
    big = engine.submit([[5, 6, 7]] * 30, SamplingParams(max_new_tokens=80, temperature=0, stop_at_eot=False))
    time.sleep(0.05)
    t0 = time.perf_counter()
    small = engine.generate([[8, 9]], SamplingParams(max_new_tokens=2, temperature=0, stop_at_eot=False))
    waited = time.perf_counter() - t0
    assert len(small[0]) == 2 and not big.done()  # answered while the large request is still running
    assert len(big.result(timeout=120)) == 30 and waited < 5


def _same_up_to_rounding(compiled, plain) -> None:
    """Greedy texts of two engines whose arithmetic may differ in the last bits (a compiled graph sums in
    another order, on another CPU another way): the same log-probabilities to 1e-4 while the texts agree,
    and where they part, only at a near tie of the plain engine's two most likely tokens."""
    for mine, theirs in zip(compiled, plain, strict=True):
        parted = np.flatnonzero(np.array(mine.tokens) != np.array(theirs.tokens))  # both 30 tokens long
        same = int(parted[0]) if parted.size else len(mine.tokens)
        np.testing.assert_allclose(mine.logprobs.token_logprobs[:same], theirs.logprobs.token_logprobs[:same],
                                   atol=1e-4)
        if same < len(mine.tokens):
            top2 = theirs.logprobs.logprobs[same]
            assert top2[0] - top2[1] < 1e-4, f"the texts part at token {same} without a tie"


def test_the_compiled_decoding_step_writes_what_the_plain_one_writes(engine):
    # serve-model compiles the decoding step on a CPU by default: the same greedy and seeded tokens as the
    # plain engine, rows at different positions (prompts of 1 to 11 tokens) and a single row (its own graph).
    compiled = GenerationEngine(engine.model, EOT, batch_size=6, max_seq_len=96, compile=True)
    try:
        compiled.warm_up()
        if not compiled.compiled:  # the fallback itself: tests/teacher/test_serve_model.py
            pytest.skip("this machine cannot compile the step (no C++ compiler): nothing compiled to compare")
        greedy = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eot=False, logprobs=2)
        seeded = SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=20, stop_at_eot=False)
        for k in range(3):
            _same_up_to_rounding(compiled.submit(prompts_of(k), greedy).result(),
                                 engine.submit(prompts_of(k), greedy).result())
            # a seeded draw changes only where its uniform falls within rounding of a boundary: never, here
            assert compiled.generate(prompts_of(k), seeded, seed=k) == engine.generate(prompts_of(k), seeded,
                                                                                      seed=k)
        _same_up_to_rounding(compiled.submit(prompts_of(7)[:1], greedy).result(),
                             engine.submit(prompts_of(7)[:1], greedy).result())
    finally:
        compiled.close()
