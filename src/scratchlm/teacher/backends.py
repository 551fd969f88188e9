"""One teacher interface, three backends: a local model, any OpenAI-compatible ``/v1/completions`` server, or
a Python function.

Every backend has ``submit(prompts, params, seed) -> Future[list[Completion]]`` (callers keep work in flight)
and ``complete(...)`` (submit and wait). Spec strings: ``local:PATH_OR_HUB_ID`` (a Hugging Face folder: Phi
checkpoints run on our ``GenerationEngine``, other architectures through ``transformers``) and
``openai:URL[#model]`` (vLLM, TGI, llama.cpp's server, or ``scratchlm serve-model``; key from
$SCRATCHLM_API_KEY or the ``api_key`` argument).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from ..config import ConfigError
from ..devices import pick_device
from ..model.hf import load_hf, resolve_model_dir
from ..serving import read_api_key
from ..tokenizer import load_tokenizer
from .engine import GenerationEngine, default_batch_size
from .sampling import SamplingParams

log = logging.getLogger("scratchlm.teacher")


@dataclass
class Completion:
    text: str
    tokens: int
    finished: bool  # stopped at <|endoftext|> rather than at max tokens


def generation_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, and on a CPU with native bf16 matmuls (AVX512-BF16/AMX: faster decoding with
    oneDNN-packed weights, see bench/RESULTS.md, and half the memory); fp32 on other CPUs."""
    if device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def chain(future: Future, then: Callable) -> Future:
    """A future of ``then(future's result)``; failures pass through."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            out.set_result(then(f.result()))
        except Exception as err:
            out.set_exception(err)

    future.add_done_callback(done)
    return out


def gather(futures: list[Future]) -> Future:
    """A future of the concatenated results of ``futures`` (lists), in order; the first failure fails it."""
    out: Future = Future()
    results: list = [None] * len(futures)
    remaining = [len(futures)]

    def done(i: int, f: Future) -> None:
        if out.done():
            return
        if f.exception() is not None:
            out.set_exception(f.exception())
            return
        results[i] = f.result()
        remaining[0] -= 1
        if remaining[0] == 0:
            out.set_result([c for part in results for c in part])

    if not futures:
        out.set_result([])
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: done(i, f))
    return out


class LocalTeacher:
    """A Hugging Face-format causal LM on this machine (precision: ``generation_dtype``)."""

    prompts_per_request = 4
    """What a feed sends per request: few, so finished texts come back early."""

    def __init__(self, path: str, device: str = "auto", batch_size: int | None = None,
                 max_seq_len: int = 1024,
                 dtype: torch.dtype | None = None) -> None:
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
                                                                    self.batch_size,
                                                                    max_seq_len)
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

    def submit(self, prompts: list, params: SamplingParams, seed: int | None = None) -> Future:
        """Prompts are strings or lists of token ids."""
        ids = self.token_ids(prompts)
        if self.engine is not None:
            outs = self.engine.submit(ids, params, seed)
        else:
            outs = self.hf_pool.submit(self._hf_generate, ids, params, seed)
        return chain(outs, lambda tokens: self._completions(tokens, params))

    def complete(self, prompts: list[str], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        return self.submit(prompts, params, seed).result()

    def _completions(self, outs: list[list[int]], params: SamplingParams) -> list[Completion]:
        texts = self.tokenizer.decode_batch(outs)
        return [Completion(t, len(o), len(o) < params.max_new_tokens) for t,
                o in zip(texts, outs, strict=True)]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    @torch.inference_mode()
    def _hf_generate(self, ids: list[list[int]], params: SamplingParams, seed: int | None) -> list[list[int]]:
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
                                         eos_token_id=eot if params.stop_at_eot else None)
            for row in gen[:, width:].tolist():
                out.append(row[: row.index(eot)] if params.stop_at_eot and eot in row else row)
        return out


class OpenAITeacher:
    """Any OpenAI-compatible completions server, with up to ``concurrency`` requests of
    ``prompts_per_request`` prompts in flight. A server that refuses a list of prompts (llama.cpp's answers
    500) is detected at the first refusal and sent one prompt per request from then on."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 16,
                 prompts_per_request: int = 4, timeout_s: float = 300.0) -> None:
        self.url, self.model, self.prompts_per_request = url.rstrip("/"), model, prompts_per_request
        self.name = f"openai:{self.url}#{model}" if model else f"openai:{self.url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency + 1))
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="scratchlm-openai")
        self.max_in_flight = concurrency * prompts_per_request
        self.in_flight = 0
        self._lock = threading.Lock()

    def _model(self) -> str:
        if self.model is None:  # the server's first model, as vLLM and our serve-model list it
            r = self.http.get(self.url + "/v1/models")
            if r.status_code >= 400:
                raise RuntimeError(f"teacher {self.url}/v1/models answered {r.status_code}: {r.text[:300]}")
            self.model = r.json()["data"][0]["id"]
        return self.model

    def _post(self, prompts: list[str], params: SamplingParams, seed: int | None) -> httpx.Response:
        body = {"model": self._model(), "prompt": prompts if len(prompts) > 1 else prompts[0],
                "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p or 1.0}
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM and ours accept it; OpenAI itself ignores unknown fields
        if seed is not None:
            body["seed"] = seed
        return self.http.post(self.url + "/v1/completions", json=body)

    def _count(self, n: int) -> None:
        with self._lock:
            self.in_flight += n

    def _request(self, prompts: list[str], params: SamplingParams, seed: int | None) -> list[Completion]:
        self._count(len(prompts))
        try:
            r = self._post(prompts, params, seed)
            if r.status_code >= 400 and len(prompts) > 1 and r.status_code not in (401, 403):
                one = self._post(prompts[:1], params, seed)
                if one.status_code < 400:
                    log.warning("teacher %s refused a list of %d prompts (%d: %s) but takes one: sending one "
                                "prompt per request from now on", self.url, len(prompts), r.status_code,
                                r.text[:200])
                    self.prompts_per_request = 1
                    rest = [self._request([p], params, None if seed is None else seed + k)
                            for k, p in enumerate(prompts[1:], 1)]
                    return self._completions(one) + [c for part in rest for c in part]
            if r.status_code >= 400:
                raise RuntimeError(f"teacher {self.url} answered {r.status_code}: {r.text[:300]}")
            return self._completions(r)
        finally:
            self._count(-len(prompts))

    @staticmethod
    def _completions(r: httpx.Response) -> list[Completion]:
        reply = r.json()
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        per = reply.get("usage", {}).get("completion_tokens", 0) // max(1, len(choices))
        return [Completion(c["text"], per, c.get("finish_reason") == "stop") for c in choices]

    def submit(self, prompts: list[str], params: SamplingParams, seed: int | None = None) -> Future:
        step = self.prompts_per_request
        chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]
        return gather([self.pool.submit(self._request, chunk, params,
                                        None if seed is None else seed + i * step)
                       for i, chunk in enumerate(chunks)])

    def complete(self, prompts: list[str], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        return self.submit(prompts, params, seed).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


class FunctionTeacher:
    """A Python function ``produce(n) -> n texts`` as a teacher (notebooks, tests), called one batch at a
    time."""

    def __init__(self, produce: Callable[[int], list[str]], name: str = "function", batch: int = 16) -> None:
        self.produce, self.name = produce, name
        self.prompts_per_request = self.max_in_flight = batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scratchlm-function-teacher")
        self.in_flight = 0

    def _run(self, n: int) -> list[Completion]:
        self.in_flight += n
        try:
            return [Completion(t, 0, True) for t in self.produce(n)]  # no tokenizer here: tokens unknown
        finally:
            self.in_flight -= n

    def submit(self, prompts: list[str], params: SamplingParams, seed: int | None = None) -> Future:
        return self.pool.submit(self._run, len(prompts))

    def complete(self, prompts: list[str], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        return self.submit(prompts, params, seed).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def load_teacher(spec: str, api_key_file: str | None = None, device: str = "auto",
                 batch_size: int | None = None,
                 concurrency: int = 16, prompts_per_request: int = 4):
    """A teacher from a spec string: ``local:PATH_OR_HUB_ID`` or ``openai:URL[#model]``."""
    kind, _, target = spec.partition(":")
    if kind == "local" and target:
        return LocalTeacher(target, device=device, batch_size=batch_size)
    if kind == "openai" and target:
        url, _, model = target.partition("#")
        return OpenAITeacher(url, model or None, read_api_key(api_key_file), concurrency, prompts_per_request)
    raise ConfigError(f"teacher spec {spec!r}: use local:PATH_OR_HUB_ID or openai:URL[#model]")
