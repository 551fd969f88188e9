"""Generation throughput: our continuous-batching sampler against transformers' ``generate``, same model,
batch, prompt length, new tokens and precision, in the same run. Both decode greedily and never stop early
(every sequence writes exactly ``--new-tokens``). Each side is warmed up at full size first; medians of
``--repeats``.

    python bench/gen_throughput.py --model phi-tiny --batch 32                         # CPU
    python bench/gen_throughput.py --model phi-2 --batch 256 --device cuda --hf-static-compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi-tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="both models' precision (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--hf-static-compile", action="store_true",
                   help="transformers with static cache + compile")
    args = p.parse_args()

    from transformers import PhiConfig, PhiForCausalLM

    from scratchlm.model.config import get_preset
    from scratchlm.model.hf import hf_config, to_hf_state_dict
    from scratchlm.model.model import Phi
    from scratchlm.teacher.sampling import BatchGenerator, SamplingParams

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = get_preset(args.model)
    torch.manual_seed(0)
    ours = Phi(cfg).to(device=device, dtype=dtype).eval()
    hf_cfg = PhiConfig(**{k: v for k,
                          v in hf_config(cfg).items() if k not in ("architectures", "torch_dtype")})
    theirs = PhiForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    theirs.load_state_dict(to_hf_state_dict(ours))
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), device=device)
    new = args.new_tokens
    engine = BatchGenerator(ours, eot_id=50256, batch_size=args.batch, max_seq_len=args.prompt_len + new)
    params = SamplingParams(max_new_tokens=new, temperature=0, stop_at_eot=False)
    hf_kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=50256)
    if args.hf_static_compile:
        # transformers compiles the decoding step itself when the cache is static (on a GPU).
        hf_kwargs.update(cache_implementation="static")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_ours() -> int:
        out = engine.generate(prompts.tolist(), params)
        return sum(len(o) for o in out)

    @torch.inference_mode()
    def run_theirs() -> int:
        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kwargs)
        return (out.shape[1] - args.prompt_len) * out.shape[0]

    results: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _name, fn in (("ours", run_ours), ("transformers", run_theirs)):
        fn()  # full-size warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            sync()
            t0 = time.perf_counter()
            tokens = fn()
            sync()
            results[name].append(tokens / (time.perf_counter() - t0))
            assert tokens == args.batch * new, (name, tokens)
    med = {k: statistics.median(v) for k, v in results.items()}
    cache = "static cache + compile" if args.hf_static_compile else "dynamic cache"
    print(f"{args.model} {device} {str(dtype).removeprefix('torch.')} batch {args.batch}, prompt "
          f"{args.prompt_len}, {new} new tokens; transformers {cache}")
    for k, v in med.items():
        print(f"{k:>14}: {v:>10,.0f} new tokens/s   (runs: {', '.join(f'{x:,.0f}' for x in results[k])})")
    print(f"ratio ours/transformers: {med['ours'] / med['transformers']:.2f}")
    print(f"RESULT gen {args.model} b{args.batch} {str(dtype).removeprefix('torch.')}"
          f"{' vs-static-compile' if args.hf_static_compile else ''}: ours {med['ours']:,.0f} tok/s, "
          f"transformers {med['transformers']:,.0f} tok/s, ratio {med['ours'] / med['transformers']:.2f}")


if __name__ == "__main__":
    main()
