"""The ``Teacher`` contract over any OpenAI-compatible ``/v1/completions`` server (vLLM, TGI, llama.cpp's
server, or ``scratchlm serve-model``): ``openai:URL[#model]``, key from $SCRATCHLM_API_KEY or ``api_key``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np

from ..tokenizer import Tokenizer
from .protocol import Completion, TopK, chain, gather
from .sampling import SamplingParams

log = logging.getLogger("scratchlm.teacher")


class OpenAITeacher:
    """Any OpenAI-compatible completions server, with up to ``concurrency`` requests of
    ``prompts_per_request`` prompts in flight. A server that refuses a list of prompts (llama.cpp's answers
    500) is detected at the first refusal and sent one prompt per request from then on.

    Log-probabilities: generation asks ``logprobs`` with vLLM's ``return_tokens_as_token_ids``, so the
    teacher's own token ids come back (from a server that ignores it, ``tokenizer`` gives the text's ids).
    Scoring asks vLLM's ``prompt_logprobs`` (ids and log-probabilities of every prompt position) and, from a
    server that does not answer it, falls back to ``echo`` with ``logprobs`` (the shape lm-eval's
    ``local-completions`` sends); the log says which is used.
    """

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 16,
                 prompts_per_request: int = 4, timeout_s: float = 300.0,
                 tokenizer: Tokenizer | None = None) -> None:
        self.url, self.model, self.prompts_per_request = url.rstrip("/"), model, prompts_per_request
        self.name = f"openai:{self.url}#{model}" if model else f"openai:{self.url}"
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency + 1))
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="scratchlm-openai")
        self.max_in_flight = concurrency * prompts_per_request
        self.in_flight = 0
        self.context_length = 2048
        """Positions a prompt and its completion may take (the server's ``max_model_len`` when it says)."""
        self.scoring: str | None = None
        """How this server scores: 'prompt_logprobs' (vLLM's) or 'echo' (found at the first score)."""
        self._lock = threading.Lock()

    def _model(self) -> str:
        if self.model is None:  # the server's first model, as vLLM and our serve-model list it
            r = self.http.get(self.url + "/v1/models")
            if r.status_code >= 400:
                raise RuntimeError(f"teacher {self.url}/v1/models answered {r.status_code}: {r.text[:300]}")
            card = r.json()["data"][0]
            self.model, self.context_length = card["id"], card.get("max_model_len") or self.context_length
        return self.model

    def _body(self, prompts: list, params: SamplingParams, seed: int | None) -> dict:
        body = {"model": self._model(), "prompt": prompts if len(prompts) > 1 else prompts[0],
                "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p or 1.0}
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM and ours accept it; OpenAI itself ignores unknown fields
        if seed is not None:
            body["seed"] = seed
        if params.logprobs:
            body.update(logprobs=params.logprobs, return_tokens_as_token_ids=True)
        return body

    def _count(self, n: int) -> None:
        with self._lock:
            self.in_flight += n

    def _request(self, prompts: list, body: Callable[[list, int], dict], parse: Callable) -> list:
        """POST ``body(prompts, k)`` (k: the prompt's number, for its seed) and ``parse`` the answer; a server
        that refuses a list of prompts but takes one is sent one at a time from then on."""
        self._count(len(prompts))
        try:
            r = self.http.post(self.url + "/v1/completions", json=body(prompts, 0))
            if r.status_code >= 400 and len(prompts) > 1 and r.status_code not in (401, 403):
                one = self.http.post(self.url + "/v1/completions", json=body(prompts[:1], 0))
                if one.status_code < 400:
                    log.warning("teacher %s refused a list of %d prompts (%d: %s) but takes one: sending one "
                                "prompt per request from now on", self.url, len(prompts), r.status_code,
                                r.text[:200])
                    self.prompts_per_request = 1
                    rest = [parse(self.http.post(self.url + "/v1/completions", json=body([p], k)))
                            for k, p in enumerate(prompts[1:], 1)]
                    return parse(one) + [c for part in rest for c in part]
            return parse(r)
        finally:
            self._count(-len(prompts))

    def _choices(self, r: httpx.Response) -> list[dict]:
        if r.status_code >= 400:
            raise RuntimeError(f"teacher {self.url} answered {r.status_code}: {r.text[:300]}")
        return sorted(r.json()["choices"], key=lambda c: c["index"])

    def _completions(self, r: httpx.Response, k: int) -> list[Completion]:
        out = []
        for c in self._choices(r):
            rows, ids = (_openai_rows(c["logprobs"], k) if k and c.get("logprobs") else (None, None))
            if ids is None and self.tokenizer is not None:
                ids = self.tokenizer.encode(c["text"])
            out.append(Completion(ids, c["text"], c.get("finish_reason") == "stop", rows))
        return out

    def submit(self, prompts: list, params: SamplingParams, seed: int | None = None) -> Future:
        step = self.prompts_per_request
        chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]

        def body(first: int):
            return lambda part, k: self._body(part, params, None if seed is None else seed + first + k)

        return gather([self.pool.submit(self._request, chunk, body(i * step),
                                        lambda r: self._completions(r, params.logprobs))
                       for i, chunk in enumerate(chunks)])

    def complete(self, prompts: list, params: SamplingParams, seed: int | None = None) -> list[Completion]:
        return self.submit(prompts, params, seed).result()

    def submit_score(self, sequences: list[list[int]], k: int) -> Future:
        """Each sequence in windows the server's context takes (one position left for the token it must
        generate), the windows' rows put back together."""
        self._model()
        width = max(2, self.context_length - 1)
        windows = [(i, seq[start : start + width + 1]) for i, seq in enumerate(sequences)
                   for start in range(0, max(0, len(seq) - 1), width)]
        futures = [self.pool.submit(self._score_one, window, k) for _, window in windows]

        def assemble(rows: list[TopK]) -> list[TopK]:
            parts: list[list[TopK]] = [[] for _ in sequences]
            for (i, _), part in zip(windows, rows, strict=True):
                parts[i].append(part)
            return [TopK.concat(p, k) for p in parts]

        return chain(gather([chain(f, lambda rows: [rows]) for f in futures]), assemble)

    def score(self, sequences: list[list[int]], k: int) -> list[TopK]:
        return self.submit_score(sequences, k).result()

    def _score_one(self, ids: list[int], k: int) -> TopK:
        base = {"model": self._model(), "prompt": ids, "max_tokens": 1, "temperature": 0}
        if self.scoring in (None, "prompt_logprobs"):
            r = self.http.post(self.url + "/v1/completions", json={**base, "prompt_logprobs": k})
            choice = self._choices(r)[0]
            if choice.get("prompt_logprobs"):
                if self.scoring is None:
                    log.info("teacher %s scores with vLLM's prompt_logprobs", self.url)
                self.scoring = "prompt_logprobs"
                return _prompt_logprobs_rows(choice["prompt_logprobs"][1:], ids[1:], k)
            log.info("teacher %s does not answer prompt_logprobs: scoring with echo + logprobs", self.url)
        self.scoring = "echo"
        r = self.http.post(self.url + "/v1/completions", json={**base, "echo": True, "logprobs": k,
                                                               "return_tokens_as_token_ids": True})
        rows, _ = _openai_rows(self._choices(r)[0]["logprobs"], k, skip=1, keep=len(ids) - 1)
        return rows

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def _token_id(token: str) -> int | None:
    """``token_id:N`` (vLLM's ``return_tokens_as_token_ids``) → N; another form → None."""
    return int(token[9:]) if token.startswith("token_id:") and token[9:].isdigit() else None


def _openai_rows(logprobs: dict, k: int, skip: int = 0, keep: int | None = None) -> tuple[TopK, list | None]:
    """OpenAI's ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``) of positions ``skip`` to
    ``skip + keep`` as a ``TopK`` (top entries keyed ``token_id:N``), and the token ids when the server gave
    them."""
    end = None if keep is None else skip + keep
    tokens = logprobs["tokens"][skip:end]
    ids = [_token_id(t) for t in tokens]
    tops = logprobs.get("top_logprobs") or [{}] * len(tokens)
    top_ids = np.zeros((len(tokens), k), np.int32)
    top_lps = np.full((len(tokens), k), -np.inf, np.float32)
    for n, top in enumerate(tops[skip:end]):
        best = sorted((top or {}).items(), key=lambda kv: -kv[1])[:k]
        for j, (token, lp) in enumerate(best):
            top_ids[n, j], top_lps[n, j] = _token_id(token) or 0, lp
    token_lps = np.array(logprobs["token_logprobs"][skip:end], dtype=np.float32)
    return TopK(top_ids, top_lps, token_lps), None if None in ids else ids


def _prompt_logprobs_rows(positions: list[dict], targets: list[int], k: int) -> TopK:
    """vLLM's ``prompt_logprobs`` (per position: token id → {logprob, rank}) as a ``TopK``."""
    top_ids = np.zeros((len(targets), k), np.int32)
    top_lps = np.full((len(targets), k), -np.inf, np.float32)
    token_lps = np.zeros(len(targets), np.float32)
    for n, (entry, target) in enumerate(zip(positions, targets, strict=True)):
        ranked = sorted(((int(t), v) for t, v in entry.items()), key=lambda kv: kv[1].get("rank", 0))
        best = sorted(ranked, key=lambda kv: -kv[1]["logprob"])[:k]
        for j, (token, v) in enumerate(best):
            top_ids[n, j], top_lps[n, j] = token, v["logprob"]
        token_lps[n] = entry[str(target)]["logprob"]
    return TopK(top_ids, top_lps, token_lps)
