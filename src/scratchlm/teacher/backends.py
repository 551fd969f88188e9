"""One teacher interface, two backends: a local model, or any OpenAI-compatible ``/v1/completions`` server.

Spec strings: ``local:PATH_OR_HUB_ID`` (a Hugging Face folder; Phi checkpoints run on our model with
continuous batching, other architectures through ``transformers``) and ``openai:URL[#model]`` (vLLM, TGI,
llama.cpp's server, or ``scratchlm serve-model``; key from $SCRATCHLM_API_KEY or the ``api_key`` argument).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from ..config import ConfigError
from ..devices import pick_device
from ..model.hf import load_hf, resolve_model_dir
from ..serving import read_api_key
from ..tokenizer import load_tokenizer
from .sampling import BatchGenerator, SamplingParams


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


class LocalTeacher:
    """A Hugging Face-format causal LM on this machine (precision: ``generation_dtype``)."""

    def __init__(self, path: str, device: str = "auto", batch_size: int = 32, max_seq_len: int = 1024,
                 dtype: torch.dtype | None = None) -> None:
        self.name = path
        self.device = pick_device(device)
        dtype = dtype or generation_dtype(self.device)
        model_dir = resolve_model_dir(path)
        self.tokenizer = load_tokenizer(str(model_dir) if (model_dir / "tokenizer.json").exists() else None)
        config = json.loads((model_dir / "config.json").read_text())
        self.lock = threading.Lock()  # one generation at a time owns the KV cache
        if config.get("model_type") == "phi":
            model = load_hf(str(model_dir), device=self.device, dtype=dtype)
            self.engine = BatchGenerator(model, self.tokenizer.eot_id, batch_size, max_seq_len)
            self.hf_model = None
        else:  # any other causal LM with a compatible tokenizer: transformers' own generate
            from transformers import AutoModelForCausalLM

            self.engine = None
            self.hf_model = AutoModelForCausalLM.from_pretrained(model_dir,
                                                                 dtype=dtype).to(self.device).eval()
            self.batch_size = batch_size

    def complete(self, prompts: list[str], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        ids = self.tokenizer.encode_batch(prompts)
        with self.lock:
            outs = self.engine.generate(ids, params, seed) if self.engine else self._hf_generate(ids, params,
                                                                                                 seed)
        texts = self.tokenizer.decode_batch(outs)
        return [Completion(t, len(o), len(o) < params.max_new_tokens) for t,
                o in zip(texts, outs, strict=True)]

    @torch.inference_mode()
    def _hf_generate(self, ids: list[list[int]], params: SamplingParams, seed: int | None) -> list[list[int]]:
        if seed is not None:
            torch.manual_seed(seed)
        eot, out = self.tokenizer.eot_id, []
        for i in range(0, len(ids), self.batch_size):
            chunk = [p or [eot] for p in ids[i : i + self.batch_size]]
            width = max(map(len, chunk))
            # left padding
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
    """Any OpenAI-compatible completions server; prompts go out in chunks, several requests at once."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 4,
                 chunk: int = 16, timeout_s: float = 300.0) -> None:
        self.url, self.model, self.chunk = url.rstrip("/"), model, chunk
        self.name = f"{self.url}#{model}" if model else self.url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="scratchlm-openai")

    def _model(self) -> str:
        if self.model is None:  # the server's first model, as vLLM and our serve-model list it
            r = self.http.get(self.url + "/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        return self.model

    def _request(self, prompts: list[str], params: SamplingParams, seed: int | None) -> list[Completion]:
        body = {"model": self._model(), "prompt": prompts, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p or 1.0}
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM and ours accept it; OpenAI itself ignores unknown fields
        if seed is not None:
            body["seed"] = seed
        r = self.http.post(self.url + "/v1/completions", json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"teacher {self.url} answered {r.status_code}: {r.text[:200]}")
        reply = r.json()
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        per = reply.get("usage", {}).get("completion_tokens", 0) // max(1, len(choices))
        return [Completion(c["text"], per, c.get("finish_reason") == "stop") for c in choices]

    def complete(self, prompts: list[str], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        chunks = [prompts[i : i + self.chunk] for i in range(0, len(prompts), self.chunk)]
        seeds = [None if seed is None else seed + i for i in range(len(chunks))]
        return [c for part in self.pool.map(lambda a: self._request(a[0], params, a[1]),
                                            zip(chunks, seeds, strict=True))
                for c in part]


def load_teacher(spec: str, api_key_file: str | None = None, device: str = "auto", batch_size: int = 32):
    """A teacher from a spec string: ``local:PATH_OR_HUB_ID`` or ``openai:URL[#model]``."""
    kind, _, target = spec.partition(":")
    if kind == "local" and target:
        return LocalTeacher(target, device=device, batch_size=batch_size)
    if kind == "openai" and target:
        url, _, model = target.partition("#")
        return OpenAITeacher(url, model or None, read_api_key(api_key_file))
    raise ConfigError(f"teacher spec {spec!r}: use local:PATH_OR_HUB_ID or openai:URL[#model]")
