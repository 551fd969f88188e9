"""Generation throughput: our engine against transformers' ``generate``, same weights, batch, prompt length,
new tokens, precision and sampling settings, in the same run. A teacher samples, so the sampled case is the
one that counts; greedy is measured beside it. Every sequence writes exactly ``--new-tokens`` (no early stop).
Each side is warmed up at full size first; medians of ``--repeats``. A teacher that hands out soft labels
also pays for its top-k log-probabilities: ``--logprobs K`` times our sampled case with them (against ours
without, in the same turns), and ``--score-len N`` our scoring (a prefill, no decoding, top ``K``) of
``--score-batch`` sequences of N tokens, as ``prepare --soft-labels`` and a feed's ``--score-corpus`` ask.

    python bench/gen_throughput.py --model phi-tiny --batch 16 32 --new-tokens 256     # CPU, sampled + greedy
    python bench/gen_throughput.py --model phi-2 --batch 64 256 --device cuda --hf-static-compile \
        --logprobs 20 --score-len 512
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from functools import partial

import torch


def measure(runs: dict, sync, repeats: int, expect: int) -> dict[str, list[float]]:
    """Tokens per second of each of ``runs`` (name → function returning its new tokens), ``repeats`` times,
    taking turns, so that a machine's drift touches them all alike; each warmed up twice at full size
    first."""
    for run in runs.values():
        run()
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            tokens = run()
            sync()
            rates[name].append(tokens / (time.perf_counter() - t0))
            assert tokens == expect, (name, tokens)
    return rates


def our_engines(model, batch: int, max_seq_len: int, compiled: bool) -> dict:
    """Our engine, and with ``compiled`` a second one with its decoding step compiled (warmed up)."""
    from scratchlm.teacher.engine import GenerationEngine

    engines = {"ours": GenerationEngine(model, eot_id=50256, batch_size=batch, max_seq_len=max_seq_len)}
    if compiled:
        engines["ours compiled"] = GenerationEngine(model, eot_id=50256, batch_size=batch,
                                                    max_seq_len=max_seq_len, compile=True)
        engines["ours compiled"].warm_up()
    return engines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi-tiny")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="the feed's teacher settings by default")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens too, both sides (llama.cpp's default: 40)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="both models' precision (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--hf-static-compile", action="store_true",
                   help="transformers with static cache + compile")
    p.add_argument("--compile", action="store_true",
                   help="also time our engine with its decoding step compiled (serve-model's CPU default)")
    p.add_argument("--logprobs", type=int, default=0, metavar="K",
                   help="also time our sampled case with the top K log-probabilities at every new token")
    p.add_argument("--score-len", type=int, default=0, metavar="N",
                   help="also time our scoring of sequences of N tokens (top K, --logprobs or 20)")
    p.add_argument("--score-batch", type=int, default=32)
    args = p.parse_args()

    from transformers import PhiConfig, PhiForCausalLM

    from scratchlm.model.config import get_preset
    from scratchlm.model.hf import hf_config, to_hf_state_dict
    from scratchlm.model.model import Phi
    from scratchlm.teacher.sampling import SamplingParams

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    dtype_name = str(dtype).removeprefix("torch.")
    cfg = get_preset(args.model)
    torch.manual_seed(0)
    ours = Phi(cfg).to(device=device, dtype=dtype).eval()
    hf_cfg = PhiConfig(**{k: v for k, v in hf_config(cfg).items()
                          if k not in ("architectures", "torch_dtype")})
    theirs = PhiForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    theirs.load_state_dict(to_hf_state_dict(ours))
    new = args.new_tokens
    cache = "static cache + compile" if args.hf_static_compile else "dynamic cache"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batch in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=device)
        engines = our_engines(ours, batch, args.prompt_len + new, args.compile)
        engine = engines["ours"]
        runs = {}
        for case, temperature, top_p, top_k in (("sampled", args.temperature, args.top_p, args.top_k),
                                                ("greedy", 0.0, None, None)):
            params = SamplingParams(max_new_tokens=new, temperature=temperature, top_p=top_p, top_k=top_k,
                                    stop_at_eot=False)
            hf_kwargs = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=50256,
                             do_sample=temperature > 0, temperature=temperature or None, top_p=top_p,
                             **({"top_k": top_k} if top_k else {}))
            if args.hf_static_compile:  # transformers compiles the decoding step itself with a static cache
                hf_kwargs.update(cache_implementation="static")

            def run_ours(params=params, engine=engine, prompts=prompts) -> int:
                return sum(len(o) for o in engine.generate(prompts.tolist(), params, seed=0))

            @torch.inference_mode()
            def run_theirs(hf_kwargs=hf_kwargs, prompts=prompts) -> int:
                out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kwargs)
                return (out.shape[1] - args.prompt_len) * out.shape[0]

            for name, one in engines.items():
                runs[(case, name)] = partial(run_ours, engine=one)
            runs[(case, "transformers")] = run_theirs
        if args.logprobs:
            with_logprobs = SamplingParams(max_new_tokens=new, temperature=args.temperature, top_p=args.top_p,
                                           stop_at_eot=False, logprobs=args.logprobs)
            runs["sampled", "ours + logprobs"] = partial(run_ours, params=with_logprobs)
        rates = measure(runs, sync, args.repeats, batch * new)
        med = {key: statistics.median(r) for key, r in rates.items()}
        for (case, name), r in rates.items():
            print(f"{case:>8} b{batch} {name:>13}: {med[case, name]:>10,.0f} new tokens/s   "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in r)})", flush=True)
        if args.logprobs:
            print(f"RESULT gen {args.model} b{batch} {dtype_name} {new} new sampled with logprobs "
                  f"{args.logprobs}: ours {med['sampled', 'ours + logprobs']:,.0f} tok/s, "
                  f"{med['sampled', 'ours + logprobs'] / med['sampled', 'ours']:.2f}x ours without")
        sampled = f"T={args.temperature} top-p={args.top_p}" + (f" top-k={args.top_k}" if args.top_k else "")
        cases = (("sampled", sampled), ("greedy", "greedy"))
        for (case, settings), name in itertools.product(cases, engines):
            ratio = med[case, name] / med[case, "transformers"]
            print(f"RESULT gen {args.model} b{batch} {dtype_name} {new} new {settings}"
                  f"{' vs-static-compile' if args.hf_static_compile else ''}: {name} {med[case, name]:,.0f} "
                  f"tok/s, transformers {med[case, 'transformers']:,.0f} tok/s ({cache}), ratio {ratio:.2f}")
        # Sampling's own cost, as the runs took turns: the median of each repeat's greedy / sampled speed.
        cost = statistics.median(g / s for g, s in zip(rates["greedy", "ours"], rates["sampled", "ours"],
                                                       strict=True))
        print(f"RESULT gen {args.model} b{batch} {dtype_name} sampled vs greedy, ours: greedy/sampled speed "
              f"{cost:.2f}", flush=True)
        for one in engines.values():
            one.close()
    if args.score_len:
        score_rate(ours, args, sync, dtype_name)


def score_rate(model, args: argparse.Namespace, sync, dtype_name: str) -> None:
    """Our engine scoring ``--score-batch`` random sequences of ``--score-len`` tokens at top k: scored
    positions a second, median of ``--repeats`` after two full-size warm-ups."""
    from scratchlm.teacher.engine import GenerationEngine

    k = args.logprobs or 20
    engine = GenerationEngine(model, eot_id=50256, batch_size=args.score_batch, max_seq_len=args.score_len)
    sequences = torch.randint(0, model.config.vocab_size, (args.score_batch, args.score_len)).tolist()

    def run() -> int:
        return sum(len(rows) for rows in engine.submit_score(sequences, k).result())

    rates = measure({"score": run}, sync, args.repeats, args.score_batch * (args.score_len - 1))["score"]
    engine.close()
    print(f"RESULT score {args.model} {args.score_batch}x{args.score_len} {dtype_name} top {k}: ours "
          f"{statistics.median(rates):,.0f} scored tok/s (runs: {', '.join(f'{x:,.0f}' for x in rates)})",
          flush=True)


if __name__ == "__main__":
    main()
