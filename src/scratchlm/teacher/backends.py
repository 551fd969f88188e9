"""The ``Teacher`` contract (``protocol``) implemented three ways: a local model and a Python function here,
any OpenAI-compatible ``/v1/completions`` server in ``openai_teacher``; ``load_teacher`` reads a spec.

Spec strings: ``local:PATH_OR_HUB_ID`` (a Hugging Face folder: Phi checkpoints run on our
``GenerationEngine``, other architectures through ``transformers``) and ``openai:URL[#model]`` (vLLM, TGI,
llama.cpp's server, or ``scratchlm serve-model``; key from $SCRATCHLM_API_KEY or the ``api_key`` argument).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..config import ConfigError
from ..devices import pick_device
from ..model.hf import TRAINED_BLOCK_KEY, load_hf, resolve_model_dir
from ..serving import read_api_key
from ..tokenizer import Tokenizer, load_tokenizer
from .engine import GenerationEngine, default_batch_size
from .engine_requests import Generated
from .openai_teacher import OpenAITeacher
from .protocol import Completion, Teacher, TopK, chain
from .sampling import SamplingParams
from .topk import raw_top_k

log = logging.getLogger("scratchlm.teacher")

__all__ = ["Completion", "FunctionTeacher", "LocalTeacher", "OpenAITeacher", "Teacher", "TopK",
           "load_teacher"]


def generation_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; on a CPU, bf16 where its bf16 matmuls are the faster (AMX tiles, or AMD's AVX512-BF16:
    bf16 won on both), fp32 elsewhere (an Intel Xeon with AVX512-BF16 but no AMX ran fp32 faster: 1,214
    against 874 sampled tokens/s, bench/RESULTS.md). Decided from what the CPU is, never from a timing: a
    timing taken while another job runs can flip, and prepared soft labels would change with it."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() and (
            torch.cpu._is_amx_tile_supported() or _cpu_vendor() == "AuthenticAMD"):
        return torch.bfloat16
    return torch.float32


@functools.cache
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return ""


class LocalTeacher:
    """A Hugging Face-format causal LM on this machine (precision: ``generation_dtype``)."""

    prompts_per_request = 4
    """What a feed sends per request: few, so finished texts come back early."""

    def __init__(self, path: str, device: str = "auto", batch_size: int | None = None,
                 max_seq_len: int = 1024,
                 dtype: torch.dtype | None = None, compile: bool = False) -> None:
        self.name = f"local:{path}"
        self.device = pick_device(device)
        dtype = dtype or generation_dtype(self.device)
        self.batch_size = batch_size or default_batch_size(self.device)
        model_dir = resolve_model_dir(path)
        self.tokenizer = load_tokenizer(str(model_dir) if (model_dir / "tokenizer.json").exists() else None)
        config = json.loads((model_dir / "config.json").read_text())
        if config.get("model_type") == "phi":
            model = load_hf(str(model_dir), device=self.device, dtype=dtype)
            self.engine: GenerationEngine | None = GenerationEngine(model, self.tokenizer.eot_id,
                                                                    self.batch_size, max_seq_len, compile)
            self.engine.warm_up()  # compiled now (if asked), before the first caller waits for it
            # Score in windows of the length it was trained at: positions beyond it were never trained
            # (measured: 0.09 nats worse where a phi-tiny trained at 256 scored at 256-511).
            trained = config.get(TRAINED_BLOCK_KEY)
            if trained:
                self.engine.score_window = min(self.engine.max_seq_len, trained)
        # any other causal LM with a compatible tokenizer: transformers' own generate, one call at a time
        else:
            from transformers import AutoModelForCausalLM

            self.engine = None
            self.hf_model = AutoModelForCausalLM.from_pretrained(model_dir,
                                                                 dtype=dtype).to(self.device).eval()
            self.hf_pool = ThreadPoolExecutor(1, thread_name_prefix="scratchlm-hf-generate")

    @property
    def in_flight(self) -> int:
        return self.engine.in_flight if self.engine else 0

    @property
    def context_length(self) -> int:
        """Positions a prompt and its completion may take together."""
        if self.engine is not None:
            return self.engine.max_seq_len
        return self.hf_model.config.max_position_embeddings

    @property
    def max_in_flight(self) -> int:
        """Sequences a feed keeps submitted: twice the batch, so a freed slot never waits for a prompt."""
        return 2 * self.batch_size

    def token_ids(self, prompts: list) -> list[list[int]]:
        """Prompts as token ids: strings are encoded, lists of ids pass through."""
        encoded = iter(self.tokenizer.encode_batch([p for p in prompts if isinstance(p, str)]))
        return [p if isinstance(p, list) else next(encoded) for p in prompts]

    def check(self, params: SamplingParams) -> None:
        """Refuse settings this model cannot serve (ValueError), before anything is queued."""
        if self.engine is not None:
            self.engine.check(params)

    def submit(self, prompts: list, params: SamplingParams, seed: int | None = None, on_token=None) -> Future:
        """Prompts are strings or lists of token ids; ``on_token(prompt, token, distribution)``, for a local
        Phi model, is called as each token is accepted (streaming)."""
        ids = self.token_ids(prompts)
        if self.engine is not None:
            outs = self.engine.submit(ids, params, seed, on_token)
        else:
            outs = self.hf_pool.submit(self._hf_generate, ids, params, seed)
        return chain(outs, lambda generated: self._completions(generated, params))

    def complete(self, prompts: list, params: SamplingParams, seed: int | None = None) -> list[Completion]:
        return self.submit(prompts, params, seed).result()

    def submit_score(self, sequences: list[list[int]], k: int, ranks: bool = False) -> Future:
        if self.engine is not None:
            return self.engine.submit_score(sequences, k, ranks)
        return self.hf_pool.submit(self._hf_score, sequences, k, ranks)

    def score(self, sequences: list[list[int]], k: int) -> list[TopK]:
        return self.submit_score(sequences, k).result()

    def _completions(self, outs: list[Generated], params: SamplingParams) -> list[Completion]:
        texts = self.tokenizer.decode_batch([g.tokens for g in outs])
        return [Completion(g.tokens, t, len(g.tokens) < params.max_new_tokens, g.logprobs) for t,
                g in zip(texts, outs, strict=True)]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    @torch.inference_mode()
    def _hf_generate(self, ids: list[list[int]], params: SamplingParams, seed: int | None) -> list[Generated]:
        if seed is not None:
            torch.manual_seed(seed)
        eot, out = self.tokenizer.eot_id, []
        for i in range(0, len(ids), self.batch_size):
            chunk = [p or [eot] for p in ids[i : i + self.batch_size]]
            width = max(map(len, chunk))
            # Left padding, so that every row's new tokens start at the same column.
            batch = torch.tensor([[eot] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            gen = self.hf_model.generate(batch, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                                         do_sample=params.temperature > 0,
                                         temperature=params.temperature or None,
                                         top_k=params.top_k, top_p=params.top_p, pad_token_id=eot,
                                         eos_token_id=eot if params.stop_at_eot else None,
                                         return_dict_in_generate=True, output_logits=params.logprobs > 0)
            for r, row in enumerate(gen.sequences[:, width:].tolist()):
                n = row.index(eot) if params.stop_at_eot and eot in row else len(row)
                rows = None
                if params.logprobs:  # the raw logits of each step (before any sampling setting)
                    logits = torch.stack([step[r] for step in gen.logits[:n]])
                    rows = raw_top_k(logits, torch.tensor(row[:n]), params.logprobs)
                out.append(Generated(row[:n], rows))
        return out

    @torch.inference_mode()
    def _hf_score(self, sequences: list[list[int]], k: int, ranks: bool = False) -> list[TopK]:
        """Scoring through transformers, a sequence at a time, in windows of the model's context."""
        window = self.context_length
        out = []
        for seq in sequences:
            parts = []
            for start in range(0, max(0, len(seq) - 1), window):
                ids = torch.tensor([seq[start : start + window]], device=self.device)
                logits = self.hf_model(input_ids=ids, use_cache=False).logits[0]
                targets = torch.tensor(seq[start + 1 : start + window + 1], device=self.device)
                parts.append(raw_top_k(logits[: len(targets)], targets, k, ranks))
            out.append(TopK.concat(parts, k))
        return out



class FunctionTeacher:
    """A Python function ``produce(n) -> n texts`` as a teacher (notebooks, tests), called one batch at a
    time. It has text only: no token ids, no distribution to score with."""

    def __init__(self, produce: Callable[[int], list[str]], name: str = "function", batch: int = 16) -> None:
        self.produce, self.name = produce, name
        self.prompts_per_request = self.max_in_flight = batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scratchlm-function-teacher")
        self.in_flight = 0

    def _run(self, n: int) -> list[Completion]:
        self.in_flight += n
        try:
            return [Completion(None, t, True) for t in self.produce(n)]
        finally:
            self.in_flight -= n

    def submit(self, prompts: list, params: SamplingParams, seed: int | None = None) -> Future:
        return self.pool.submit(self._run, len(prompts))

    def complete(self, prompts: list, params: SamplingParams, seed: int | None = None) -> list[Completion]:
        return self.submit(prompts, params, seed).result()

    def submit_score(self, sequences: list[list[int]], k: int) -> Future:
        raise NotImplementedError(f"teacher {self.name} is a function of texts: it has no distribution to "
                                  "score with")

    def score(self, sequences: list[list[int]], k: int) -> list[TopK]:
        return self.submit_score(sequences, k).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def load_teacher(spec: str, api_key_file: str | None = None, device: str = "auto",
                 batch_size: int | None = None, concurrency: int = 16, prompts_per_request: int = 4,
                 tokenizer: Tokenizer | None = None) -> Teacher:
    """A teacher from a spec string: ``local:PATH_OR_HUB_ID`` or ``openai:URL[#model]`` (``tokenizer``: the
    ids of a remote teacher's text, when its server does not give them)."""
    kind, _, target = spec.partition(":")
    if kind == "local" and target:
        return LocalTeacher(target, device=device, batch_size=batch_size)
    if kind == "openai" and target:
        url, _, model = target.partition("#")
        return OpenAITeacher(url, model or None, read_api_key(api_key_file), concurrency, prompts_per_request,
                             tokenizer=tokenizer)
    raise ConfigError(f"teacher spec {spec!r}: use local:PATH_OR_HUB_ID or openai:URL[#model]")
