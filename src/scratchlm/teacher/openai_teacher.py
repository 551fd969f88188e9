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
from .protocol import Completion, TeacherAnswerError, TopK, chain, gather
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
        self._told: set[str] = set()

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
            rows, ids, problem = None, None, None
            if k and c.get("logprobs"):
                try:
                    rows, ids = _openai_rows(c["logprobs"], k, tokenizer=self.tokenizer, said=self._said)
                except TeacherAnswerError as err:
                    problem = str(err)
            if ids is None and self.tokenizer is not None:
                ids = self.tokenizer.encode(c["text"])
            out.append(Completion(ids, c["text"], c.get("finish_reason") == "stop", rows, problem))
        return out

    def _said(self, what: str) -> None:
        """Log once per teacher how its answers are read (token strings mapped to ids, say)."""
        if what not in self._told:
            self._told.add(what)
            log.warning("teacher %s %s", self.name, what)

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
        generate), the windows' rows put back together. A window of ``width + 1`` tokens scores its last
        ``width``; the next starts at its last token."""
        self._model()
        width = max(2, self.context_length - 2)
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
                return _prompt_logprobs_rows(choice["prompt_logprobs"][1:], ids[1:], k, self.tokenizer,
                                             self._said)
            log.info("teacher %s does not answer prompt_logprobs: scoring with echo + logprobs", self.url)
        self.scoring = "echo"
        r = self.http.post(self.url + "/v1/completions", json={**base, "echo": True, "logprobs": k,
                                                               "return_tokens_as_token_ids": True})
        rows, _ = _openai_rows(self._choices(r)[0]["logprobs"], k, skip=1, keep=len(ids) - 1,
                               tokenizer=self.tokenizer, said=self._said)
        return rows

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()


def _token_id(token: str) -> int | None:
    """``token_id:N`` (vLLM's ``return_tokens_as_token_ids``) → N; another form → None."""
    return int(token[9:]) if token.startswith("token_id:") and token[9:].isdigit() else None


STRING_KEYS = ("keys its log-probabilities by token text, not ids (it ignores return_tokens_as_token_ids, as "
               "OpenAI's, TGI's and llama.cpp's servers do): each is mapped to the one token id that decodes "
               "to it; an answer with text that maps to none, or to several, is dropped (counted)")


def _ids_of(keys: list[str], tokenizer: Tokenizer | None, said: Callable[[str], None] | None) -> list[int]:
    """Token ids of a server's keys: ``token_id:N``, or token text mapped exactly through ``tokenizer``."""
    ids = [_token_id(key) for key in keys]
    if None not in ids:
        return ids
    if said is not None:
        said(STRING_KEYS)
    mapped = [i if i is not None else (tokenizer.id_of_piece(key) if tokenizer else None)
              for i, key in zip(ids, keys, strict=True)]
    unmapped = [key for key, i in zip(keys, mapped, strict=True) if i is None]
    if unmapped:
        raise TeacherAnswerError(f"token text {unmapped[0]!r} maps to no single token id"
                                 + ("" if tokenizer else " (no tokenizer to map it with)"))
    return mapped


def _openai_rows(logprobs: dict, k: int, skip: int = 0, keep: int | None = None,
                 tokenizer: Tokenizer | None = None,
                 said: Callable[[str], None] | None = None) -> tuple[TopK, list[int]]:
    """OpenAI's ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``) of positions ``skip`` to
    ``skip + keep`` as a ``TopK`` and the tokens' ids: keys ``token_id:N``, or token text mapped through
    ``tokenizer`` (``_ids_of``). ``TeacherAnswerError`` when the lists disagree in length or a key maps to no
    id."""
    end = None if keep is None else skip + keep
    tokens, token_lps = logprobs["tokens"][skip:end], logprobs["token_logprobs"][skip:end]
    tops = (logprobs.get("top_logprobs") or [{}] * len(logprobs["tokens"]))[skip:end]
    if not len(tokens) == len(token_lps) == len(tops):
        raise TeacherAnswerError(f"an answer of {len(tokens)} tokens, {len(token_lps)} token_logprobs and "
                                 f"{len(tops)} top_logprobs")
    top_ids = np.zeros((len(tokens), k), np.int64)
    top_lps = np.full((len(tokens), k), -np.inf, np.float32)
    for n, top in enumerate(tops):
        best = sorted((top or {}).items(), key=lambda kv: -kv[1])[:k]
        top_ids[n, : len(best)] = _ids_of([key for key, _ in best], tokenizer, said)
        top_lps[n, : len(best)] = [lp for _, lp in best]
    ids = _ids_of(tokens, tokenizer, said)
    return TopK(top_ids, top_lps, np.array(token_lps, dtype=np.float32)), ids


def _prompt_logprobs_rows(positions: list[dict], targets: list[int], k: int,
                          tokenizer: Tokenizer | None = None,
                          said: Callable[[str], None] | None = None) -> TopK:
    """vLLM's ``prompt_logprobs`` (per position: token id → {logprob, rank}) as a ``TopK``."""
    if len(positions) != len(targets):
        raise TeacherAnswerError(f"prompt_logprobs for {len(positions)} positions of {len(targets)}")
    top_ids = np.zeros((len(targets), k), np.int64)
    top_lps = np.full((len(targets), k), -np.inf, np.float32)
    token_lps = np.zeros(len(targets), np.float32)
    for n, (entry, target) in enumerate(zip(positions, targets, strict=True)):
        keyed = dict(zip(_ids_of([f"token_id:{t}" if t.isdigit() else t for t in entry], tokenizer, said),
                         entry.values(), strict=True))
        best = sorted(keyed.items(), key=lambda kv: -kv[1]["logprob"])[:k]
        top_ids[n, : len(best)] = [token for token, _ in best]
        top_lps[n, : len(best)] = [v["logprob"] for _, v in best]
        if target not in keyed:
            raise TeacherAnswerError(f"prompt_logprobs without the given token at position {n + 1}")
        token_lps[n] = keyed[target]["logprob"]
    return TopK(top_ids, top_lps, token_lps)
