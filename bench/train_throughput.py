"""Training throughput: our Phi against transformers' PhiForCausalLM, same config, batch, precision, device.

Each measurement runs in its own subprocess (so peak memory is that model's alone), warms up at full size,
then times ``--steps`` optimizer steps (forward, cross-entropy, backward, AdamW). Implementations alternate
(ours, transformers, ours, ...) ``--repeats`` times; the table reports medians and the ratio ours /
transformers.

    python bench/train_throughput.py --model phi-tiny --batch 8 --block 256              # CPU
    python bench/train_throughput.py --model phi-2 --batch 4 --block 2048 --device cuda --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from scratchlm.metrics import memory_gib
    from scratchlm.model.config import get_preset
    from scratchlm.model.model import Phi
    from scratchlm.parallelize import parallelize

    cfg = get_preset(args.model)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    if args.impl == "ours":
        model = parallelize(Phi(cfg).to(device), compile=args.compile)

        def loss_of(x, y):
            return model(x, targets=y)  # as the trainer does: the chunked head + loss
    else:
        from transformers import PhiConfig, PhiForCausalLM

        from scratchlm.model.hf import hf_config

        hf_cfg = PhiConfig(**{k: v for k,
                              v in hf_config(cfg).items() if k not in ("architectures", "torch_dtype")})
        model = PhiForCausalLM(hf_cfg).to(device)
        if args.compile:
            model = torch.compile(model)

        def loss_of(x, y):
            logits = model(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.block + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_of(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):  # full-size warm-up: compilation, allocator, kernels
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    print(json.dumps({"impl": args.impl, "tokens_per_s": args.batch * args.block / step_s, "step_s": step_s,
                      "peak_mem_gib": memory_gib(device)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--impl", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        worker(args)
        return
    results: dict[str, list[dict]] = {"ours": [], "transformers": []}
    base = [sys.executable, __file__] + [a for a in sys.argv[1:]]
    for r in range(args.repeats):
        for impl in ("ours", "transformers"):
            out = subprocess.run(base + ["--impl", impl], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl].append(res)
            print(f"run {r + 1} {impl:>12}: {res['tokens_per_s']:,.0f} tok/s, "
                  f"peak {res['peak_mem_gib']:.2f} GiB",
                  flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tokens_per_s", "peak_mem_gib")}
           for k, v in results.items()}
    ratio = med["ours"]["tokens_per_s"] / med["transformers"]["tokens_per_s"]
    print(f"\n{args.model} {args.device} {args.precision} batch {args.batch}x{args.block}"
          f"{' compiled' if args.compile else ''}: median of {args.repeats} runs × {args.steps} steps")
    print(f"{'':>14} {'tokens/s':>12} {'peak GiB':>9}")
    for k, v in med.items():
        print(f"{k:>14} {v['tokens_per_s']:>12,.0f} {v['peak_mem_gib']:>9.2f}")
    print(f"ratio ours/transformers: {ratio:.3f}")
    compiled = " compiled" if args.compile else ""
    print(f"RESULT train {args.model} {args.batch}x{args.block} {args.precision}{compiled}: "
          f"ours {med['ours']['tokens_per_s']:,.0f} tok/s {med['ours']['peak_mem_gib']:.1f} GiB, "
          "transformers "
          f"{med['transformers']['tokens_per_s']:,.0f} tok/s {med['transformers']['peak_mem_gib']:.1f} GiB, "
          f"ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
