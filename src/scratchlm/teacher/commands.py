"""CLI for the teacher: ``generate``, ``serve-model`` and ``build-corpus``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .prompts import STRATEGIES, PromptSource
from .sampling import SamplingParams


def _sampling_flags(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"tokens to generate (default {max_new})")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p)


def cmd_generate(args: argparse.Namespace) -> None:
    from .backends import LocalTeacher

    teacher = LocalTeacher(args.model, device=args.device, batch_size=max(1, args.num_samples))
    outs = teacher.complete([args.prompt] * args.num_samples, _params(args), args.seed)
    for i, c in enumerate(outs):
        print(f"--- sample {i + 1} ({c.tokens} tokens{', stopped at <|endoftext|>' if c.finished else ''})")
        print(args.prompt + c.text)


def cmd_serve_model(args: argparse.Namespace) -> None:
    from .serve_model import serve_model

    serve_model(args.model, args.host, args.port, args.api_key_file, args.batch_size, args.device)


def cmd_build_corpus(args: argparse.Namespace) -> None:
    from ..data import iter_documents
    from ..tokenizer import load_tokenizer
    from .backends import load_teacher
    from .build_corpus import build_corpus, parse_size

    size = parse_size(args.size)
    teacher = load_teacher(args.teacher, args.api_key_file, args.device, args.batch_size)
    corpus = args.prompt_corpus or os.environ.get("SCRATCHLM_DATA")
    documents = [t for _, t in iter_documents(corpus)] if corpus and {"words", "snippet"} & set(args.prompts) else []
    tokenizer = load_tokenizer() if "token" in args.prompts else None
    prompts = PromptSource(args.prompts, documents, seed=args.seed, decode=tokenizer.decode if tokenizer else None)
    summary = build_corpus(teacher, Path(args.out), size, prompts, _params(args), args.batch_size, args.seed)
    print(json.dumps(summary, indent=2))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a model (a quick look)")
    p.add_argument("--model", required=True, help="Hugging Face folder or hub id (ours or microsoft/phi-2)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated as one batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _sampling_flags(p, 64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve-model", help="serve a model through an OpenAI-compatible /v1/completions")
    p.add_argument("--model", required=True, help="Hugging Face folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs a key")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--api-key-file", help="file holding the API key (else $SCRATCHLM_API_KEY)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoded together")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve_model)

    p = sub.add_parser("build-corpus", help="generate a clean corpus with a teacher into a sample.zip")
    p.add_argument("--teacher", required=True, help="local:PATH_OR_HUB_ID or openai:URL[#model]")
    p.add_argument("--size", required=True, help="bytes of text to generate, e.g. 100MB")
    p.add_argument("--out", required=True, help="the .zip to write (rerun the same command to continue)")
    p.add_argument("--prompts", nargs="+", default=["words", "topic", "snippet"], choices=STRATEGIES,
                   help="prompt strategies, mixed (default: words topic snippet)")
    p.add_argument("--prompt-corpus", help="corpus for word and snippet prompts (default: $SCRATCHLM_DATA)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per teacher call")
    p.add_argument("--api-key-file", help="the openai teacher's API key file (else $SCRATCHLM_API_KEY)")
    p.add_argument("--device", default="auto")
    _sampling_flags(p, 256)
    p.set_defaults(func=cmd_build_corpus)
