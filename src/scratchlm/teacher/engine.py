"""One generation engine per local model: a background loop that owns the KV cache and decodes every caller's
sequences in one continuous batch, as vLLM's engine does. Scoring requests (``submit_score``: the teacher's
distribution over given tokens, no decoding) join the same batch as prefill-only sequences, so one model
serves both at once.

Callers ``submit`` requests (prompts, sampling settings, a seed) from any thread and get a ``Future``. Each of
``batch_size`` slots holds one sequence; a sequence joins the running batch at the next step (its prompt
prefilled into its slot's cache rows while the others keep decoding) and leaves it when it ends
(``<|endoftext|>`` or its max tokens), freeing the slot for the next waiting sequence. Every row carries its
own positions, so prompts of different lengths need no padding tricks, and its own sampling settings and
seeded random numbers (``sampling``), so a seeded request gives the same text alone or in company.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from ..model.cpu_inference import PackedLinear, pack_linears
from ..model.kv_cache import KVCache
from ..model.model import Phi
from .engine_requests import EngineStats, Generated, Request, Sequence, scores_of
from .protocol import TopK
from .sampling import UNIFORMS_PER_STEP, RowSettings, SamplingParams, sample
from .topk import raw_top_k

log = logging.getLogger("scratchlm.teacher")

_ENGINES: weakref.WeakSet[GenerationEngine] = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    # A thread still in torch code while the interpreter exits can abort the process: stop them first.
    for engine in list(_ENGINES):
        engine.close()


SCORE_ROWS = 256
"""Positions of a scoring window whose logits exist at once (256 × 50k floats: 51 MB)."""
SCORE_TOKENS_PER_STEP = 4096
"""Scoring work done between two decoding steps (the rest waits for the next): generation keeps moving."""


def default_batch_size(device: torch.device) -> int:
    """Sequences decoded together when not set: a GPU is busy only with hundreds, a CPU is saturated by
    tens."""
    return 256 if device.type == "cuda" else 32


class GenerationEngine:
    """Continuous batching over our Phi model for every caller of one local teacher."""

    def __init__(self, model: Phi, eot_id: int, batch_size: int = 32, max_seq_len: int | None = None,
                 compile: bool = False) -> None:
        """``compile``: the decoding step through ``torch.compile`` (``warm_up`` compiles it ahead): about 3x
        fewer milliseconds in the model at small widths, where a step is mostly the cost of launching its
        many small operations; the first steps wait for the compiler (seconds to a minute)."""
        self.model, self.eot_id, self.batch_size = model.eval(), eot_id, batch_size
        self.max_seq_len = min(max_seq_len or model.config.block_size, model.config.block_size)
        self.score_window = self.max_seq_len
        """Tokens a scoring window holds (at most the cache's; the model's trained length, where known)."""
        self.vocab_size, self.device = model.config.vocab_size, model.lm_head.weight.device
        # The LM head restricted to real token ids: padding rows are never sampled, so never computed.
        head = model.lm_head
        self.head = PackedLinear(lambda: (head.weight[: self.vocab_size], head.bias[: self.vocab_size]))
        pack_linears(model)  # on the CPU: oneDNN with reordered weights (cpu_inference)
        # A float32 cache on the CPU: attention there runs in float32 (see ``cpu_cached_attention``).
        self.cache = KVCache(model, batch_size, self.max_seq_len,
                             dtype=torch.float32 if self.device.type == "cpu" else None)
        # Dynamic shapes: one graph for any number of sequences above one and any cache length, one for one.
        self.compiled = compile
        self._decode_forward = (torch.compile(self.cache.forward, dynamic=True) if compile
                                else self.cache.forward)
        self.slots: list[Sequence | None] = [None] * batch_size
        self.stats = EngineStats()
        self._pending: deque[Request] = deque()  # requests with sequences waiting for a slot
        self._cond = threading.Condition()
        self._closed = False
        self._seeds = random.Random()
        self._thread: threading.Thread | None = None
        self._scored_now: set[int] = set()  # the scoring requests served since the last decoding step
        self._admitting: list[Sequence] = []  # the sequences being prefilled now
        self._scratch_buffer: torch.Tensor | None = None
        _ENGINES.add(self)

    @property
    def _scratch(self) -> torch.Tensor:
        """A float32 buffer of rows of logits for the top-k (made when first needed)."""
        if self._scratch_buffer is None:
            rows = max(SCORE_ROWS, self.batch_size)
            self._scratch_buffer = torch.empty(rows, self.vocab_size, device=self.device)
        return self._scratch_buffer

    # --- callers' side -------------------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
               on_token: Callable[[int, int, TopK | None], None] | None = None) -> Future:
        """Queue a request; the future's result is a ``Generated`` per prompt (its new token ids, the stop
        token excluded, and with ``params.logprobs`` their distributions), in order. Prompt i samples with
        seed ``seed + i`` (a random seed when None). ``on_token(prompt, token, distribution)`` is called as
        each new token is accepted (streaming)."""
        self.check(params)
        room = self.max_seq_len - params.max_new_tokens
        future: Future = Future()
        request = Request(params, future, [None] * len(prompts), len(prompts), on_token=on_token)
        if not prompts:
            future.set_result([])
            return future
        base = seed if seed is not None else self._seeds.getrandbits(63)
        # Any integer seeds a generator (numpy's seeds must be non-negative: hence the modulo). A prompt
        # longer than the room its completion leaves keeps its end, on purpose: the feed's own prompts are
        # short, and a longer one only steers the text. (serve-model refuses such a prompt before this.)
        sequences = [Sequence(request, i, (p or [self.eot_id])[-room:],
                               None if params.greedy else np.random.default_rng([(base + i) % 2**64]))
                     for i, p in enumerate(prompts)]
        request.waiting.extend(sequences)
        self._enqueue(request)
        return future

    def _enqueue(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation engine is closed")
            self._pending.append(request)
            self.stats.requests += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="scratchlm-engine")
                self._thread.start()
            self._cond.notify()

    def submit_score(self, sequences: list[list[int]], k: int, ranks: bool = False) -> Future:
        """Queue a scoring request: for each sequence of n tokens, the raw distribution at each of its last
        n − 1 tokens (a ``TopK`` of n − 1 rows). A sequence longer than this engine's context is scored in
        consecutive windows, the first token of each predicted from the window before."""
        if not 1 <= k <= self.vocab_size:
            raise ValueError(f"k must be in [1, {self.vocab_size}] (got {k})")
        future: Future = Future()
        width = self.score_window
        windows = [(i, start) for i, seq in enumerate(sequences) if len(seq) > 1
                   for start in range(0, len(seq) - 1, width)]
        request = Request(SamplingParams(max_new_tokens=1, temperature=0), future, [None] * len(windows),
                           len(windows), score_k=k, owners=[i for i, _ in windows], sequences=len(sequences),
                           ranks=ranks)
        if not windows:
            future.set_result(scores_of(request))
            return future
        for j, (i, start) in enumerate(windows):
            seq = sequences[i]
            window = Sequence(request, j, list(seq[start : start + width]), None)
            window.targets = list(seq[start + 1 : start + width + 1])
            request.waiting.append(window)
        self._enqueue(request)
        return future

    def check(self, params: SamplingParams) -> None:
        """ValueError for settings this engine cannot serve."""
        if self.max_seq_len - params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in this "
                             f"model's {self.max_seq_len} positions; ask for at most {self.max_seq_len - 1}")
        if 0 < params.temperature < 0.01:
            raise ValueError(f"temperature {params.temperature} is too small to sample with: use 0 (greedy) "
                             "or at least 0.01")

    def warm_up(self) -> None:
        """Compile the decoding step now (its two graphs: one sequence, several) rather than in a caller's
        first request. Where it cannot be compiled (no C++ compiler here, say), the plain step serves, with
        a warning that says why."""
        try:
            greedy = SamplingParams(max_new_tokens=2, temperature=0, stop_at_eot=False)
            for n in (1, 2) if self.compiled else ():
                self.generate([[self.eot_id]] * n, greedy)
        except Exception as err:  # a teacher that serves slower beats one that does not serve
            log.warning("the decoding step could not be compiled (%s: %.300s); decoding without compiling",
                        type(err).__name__, (str(err).strip().splitlines() or [""])[0])
            self.compiled, self._decode_forward = False, self.cache.forward

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seed: int | None = None) -> list[list[int]]:
        """``submit`` and wait: each prompt's new token ids."""
        return [g.tokens for g in self.submit(prompts, params, seed).result()]

    @property
    def in_flight(self) -> int:
        """Sequences waiting or decoding."""
        return sum(len(r.waiting) for r in list(self._pending)) + sum(s is not None for s in self.slots)

    def close(self) -> None:
        """Stop the loop after its current step; waiting requests fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # --- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not any(self.slots):
                    self._cond.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the generation engine was closed"))
                    return
            started = time.perf_counter()
            self._drop_cancelled()
            try:
                with torch.inference_mode():
                    self._score_waiting()
                    self._admit()
                    self._decode()
            except Exception as err:  # fail the requests in flight, keep serving new ones
                log.exception("generation failed")
                self._fail_all(err)
            self.stats.busy_s += time.perf_counter() - started

    def _drop_cancelled(self) -> None:
        """Requests whose callers cancelled them (a client that went away): their waiting sequences leave the
        queue and their slots are freed, before the next step spends anything on them."""
        with self._cond:
            if any(r.future.cancelled() for r in self._pending):
                self._pending = deque(r for r in self._pending if not r.future.cancelled())
        for row, seq in enumerate(self.slots):
            if seq is not None and seq.request.future.cancelled():
                self.slots[row] = None
                self.stats.cancelled += 1

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            requests, self._pending = list(self._pending), deque()
        admitting, self._admitting = self._admitting, []
        for request in requests + [s.request for s in self.slots + admitting if s is not None]:
            if not request.future.done():
                request.future.set_exception(err)
        self.slots = [None] * self.batch_size

    def _uniforms(self, rows: list[Sequence]) -> torch.Tensor | None:
        """Each sampled row's random numbers for this step, from its own generator (greedy rows: zeros)."""
        if all(s.rng is None for s in rows):
            return None
        u = np.zeros((len(rows), UNIFORMS_PER_STEP))
        for j, s in enumerate(rows):
            if s.rng is not None:
                u[j] = s.rng.random(UNIFORMS_PER_STEP)
        return torch.from_numpy(u).to(self.device)

    def _next_tokens(self, hidden: torch.Tensor, rows: list[Sequence]) -> list[int]:
        logits = self.head(hidden[:, -1])  # (B, vocab_size)
        settings = RowSettings.of([s.request.params for s in rows], self.device)
        tokens = sample(logits, settings, self._uniforms(rows))
        wanting = [j for j, s in enumerate(rows) if s.request.params.logprobs > 0]
        if wanting:  # the raw distribution's top k, where asked: a partial selection, never a sort of the row
            k = max(rows[j].request.params.logprobs for j in wanting)
            if len(wanting) == len(rows):  # the usual case: no copy of the rows
                found = raw_top_k(logits, tokens, k, scratch=self._scratch)
            else:
                picked = torch.tensor(wanting, device=self.device)
                found = raw_top_k(logits[picked], tokens[picked], k, scratch=self._scratch)
            for n, j in enumerate(wanting):
                want = rows[j].request.params.logprobs
                rows[j].rows.append(TopK(found.ids[n : n + 1, :want], found.logprobs[n : n + 1, :want],
                                         found.token_logprobs[n : n + 1]))
        return tokens.tolist()

    def _score(self, hidden: torch.Tensor, seq: Sequence) -> None:
        """A scoring window's distributions, from the prefill's hidden states (its positions that have a
        next token), in chunks of rows: the logits of a window are never whole."""
        n, k = len(seq.targets), seq.request.score_k
        targets = torch.tensor(seq.targets, device=self.device)
        parts = [raw_top_k(self.head(hidden[start : min(n, start + SCORE_ROWS)]),
                           targets[start : start + SCORE_ROWS], k, seq.request.ranks, self._scratch)
                 for start in range(0, n, SCORE_ROWS)]
        seq.rows = [TopK.concat(parts, k)]

    def _waiting(self, n: int, scoring: bool = False, budget: int | None = None) -> list[Sequence]:
        """Up to n waiting sequences of one kind (generation, or scoring windows up to ``budget`` tokens), one
        request at a time in turn: a small request is not queued behind every sequence of a large one that
        came first."""
        group: list[Sequence] = []
        with self._cond:
            turn = [r for r in self._pending if bool(r.score_k) == scoring]
            while turn and len(group) < n:
                request = turn.pop(0)
                if budget is not None and group and sum(len(s.prompt) for s in group) + len(
                        request.waiting[0].prompt) > budget:
                    break
                group.append(request.waiting.popleft())
                self._pending.remove(request)
                if request.waiting:
                    self._pending.append(request)
                    turn.append(request)
        return group

    def _score_waiting(self) -> None:
        """Scoring windows, a forward pass each over the window alone (no cache slot: they decode nothing), up
        to ``SCORE_TOKENS_PER_STEP`` tokens between two decoding steps, so that generation keeps moving."""
        group = self._admitting = self._waiting(self.batch_size, scoring=True, budget=SCORE_TOKENS_PER_STEP)
        if not group:
            return
        width = max(len(s.prompt) for s in group)
        idx = torch.full((len(group), width), self.eot_id, dtype=torch.long, device=self.device)
        for j, s in enumerate(group):  # padding after each window's tokens, which never attend to it
            idx[j, : len(s.prompt)] = torch.tensor(s.prompt, device=self.device)
        hidden = self.model.trunk(idx, self.model.rope_cos[:width], self.model.rope_sin[:width])
        self.stats.scored += sum(len(s.targets) for s in group)
        for j, seq in enumerate(group):
            self._score(hidden[j], seq)
            self._done(seq)
        self._admitting = []

    def _admit(self) -> None:
        """Prefill waiting prompts into the free slots and take each one's first token."""
        free = [r for r, s in enumerate(self.slots) if s is None]
        group = self._admitting = self._waiting(len(free))  # failed with the others if this step fails
        free = free[: len(group)]
        if not group:
            return
        lengths = torch.tensor([len(s.prompt) for s in group], device=self.device)
        width = int(lengths.max())
        idx = torch.full((len(group), width), self.eot_id, dtype=torch.long, device=self.device)
        for j, s in enumerate(group):
            idx[j, : len(s.prompt)] = torch.tensor(s.prompt, device=self.device)
        pos = torch.arange(width, device=self.device).expand(len(group), width)
        hidden = self.cache.forward(self.model, idx, pos, torch.tensor(free, device=self.device),
                                    kv_len=width, keep=lengths - 1, fresh=True)
        for row, seq, token in zip(free, group, self._next_tokens(hidden, group), strict=True):
            seq.pos = len(seq.prompt)
            self.slots[row] = seq
            self.stats.sequences += 1
            self._accept(row, token)
        self._admitting = []

    def _decode(self) -> None:
        """One step for every active sequence."""
        active = [r for r, s in enumerate(self.slots) if s is not None]
        if not active:
            return
        rows = [self.slots[r] for r in active]
        idx = torch.tensor([[s.last] for s in rows], device=self.device)
        positions = [s.pos for s in rows]
        cache_rows = torch.tensor(active, device=self.device)
        pos = torch.tensor(positions, device=self.device)[:, None]
        if not self.compiled and len(active) == self.batch_size:  # (compiled: always one form, one graph)
            cache_rows = None  # every row: the cache as it is, no gather
            if min(positions) == max(positions):  # all in step: the shared-position path
                pos = pos[0, :]
        # Attend over the cache only as far as the longest sequence (rounded up: fewer distinct shapes).
        kv_len = min(self.max_seq_len, -(-(max(positions) + 1) // 16) * 16)
        hidden = self._decode_forward(self.model, idx, pos, cache_rows, kv_len=kv_len)
        self.stats.steps += 1
        self.stats.most_requests_in_a_step = max(self.stats.most_requests_in_a_step,
                                                 len({id(s.request) for s in rows} | self._scored_now))
        self._scored_now = set()
        for row, seq, token in zip(active, rows, self._next_tokens(hidden, rows), strict=True):
            seq.pos += 1
            self._accept(row, token)

    def _accept(self, row: int, token: int) -> None:
        seq = self.slots[row]
        params = seq.request.params
        if params.stop_at_eot and token == self.eot_id:
            del seq.rows[len(seq.out) :]  # the stop token's distribution: not one of the text's tokens
            self._finish(row)
            return
        seq.out.append(token)
        seq.last = token
        self.stats.tokens += 1
        if seq.request.on_token is not None:  # a streamed request: each token as it comes
            seq.request.on_token(seq.index, token, seq.rows[-1] if seq.rows else None)
        if len(seq.out) >= params.max_new_tokens:
            self._finish(row)

    def _finish(self, row: int) -> None:
        seq, self.slots[row] = self.slots[row], None
        self._done(seq)

    def _done(self, seq: Sequence) -> None:
        """A sequence (or scoring window) is complete: its result is kept, and its request's given when all
        are."""
        request = seq.request
        if request.score_k:
            request.results[seq.index] = seq.rows[0]
            self._scored_now.add(id(request))
        else:
            k = request.params.logprobs
            request.results[seq.index] = Generated(seq.out, TopK.concat(seq.rows, k) if k else None)
        request.remaining -= 1
        if request.remaining == 0 and not request.future.done():
            request.future.set_result(scores_of(request) if request.score_k else request.results)
