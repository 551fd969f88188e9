"""Training throughput: our Phi against transformers' PhiForCausalLM, same config, batch, precision, device.

Each measurement runs in its own subprocess (so peak memory is that model's alone), warms up at full size,
then times ``--steps`` optimizer steps (forward, cross-entropy, backward, AdamW). Implementations alternate
(ours, transformers, ours, ...) ``--repeats`` times; the table reports medians and the ratio ours /
transformers.
With ``--distill K`` our side also times a distilled step (A 0.5, a teacher's top K at every position) on the
same model, alternated step by step with its plain step (plain, distilled, plain, ...): the KL's cost as a
ratio of medians in the same process, each kind warmed up first. On a known GPU, MFU is
printed beside tokens/s.

    python bench/train_throughput.py --model phi-tiny --batch 8 --block 256              # CPU
    python bench/train_throughput.py --model phi-2 --batch 4 --block 2048 --device cuda --compile --distill 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def worker(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    from scratchlm.model.config import get_preset
    from scratchlm.model.loss import Distill
    from scratchlm.model.model import Phi
    from scratchlm.training.metrics import gpu_peak_flops, memory_gib, mfu
    from scratchlm.training.parallelize import parallelize

    cfg = get_preset(args.model)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    if args.impl == "ours":
        with device:  # weights made where they live: a 2.7B model's init on the CPU costs tens of seconds
            model = parallelize(Phi(cfg), compile=args.compile)

        def loss_of(x, y, soft=None):  # as the trainer does: the chunked head + loss
            if soft is None:
                return model(x, targets=y).loss
            return model(x, targets=y, soft=soft, distill=Distill(weight=0.5)).loss
    else:
        from transformers import PhiConfig, PhiForCausalLM

        from scratchlm.model.hf import hf_config

        hf_cfg = PhiConfig(**{k: v for k,
                              v in hf_config(cfg).items() if k not in ("architectures", "torch_dtype")})
        with device:
            model = PhiForCausalLM(hf_cfg)
        if args.compile:
            model = torch.compile(model)

        def loss_of(x, y, soft=None):  # soft: ours only
            logits = model(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.block + 1), device=device)

    def step(soft=None) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_of(data[:, :-1], data[:, 1:], soft)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_steps(soft=None) -> float:
        """Median seconds a step, after a full-size warm-up (compilation, allocator, kernels)."""
        for _ in range(args.warmup):
            step(soft)
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(soft)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    if args.impl == "ours" and args.distill:
        soft = random_soft_labels(args.batch, args.block, args.distill, cfg.vocab_size, device)
        step_s, distill_s = alternated(step, sync, soft, args.warmup, args.steps)
    else:
        step_s, distill_s = timed_steps(), None
    tokens_per_s = args.batch * args.block / step_s
    result = {"impl": args.impl, "tokens_per_s": tokens_per_s, "step_s": step_s,
              "peak_mem_gib": memory_gib(device)}
    peak = gpu_peak_flops(device)
    if peak:
        result["mfu"] = mfu(cfg.flops_per_token(args.block), tokens_per_s, peak[1])
    if distill_s is not None:
        result["distill_tokens_per_s"] = args.batch * args.block / distill_s
    print(json.dumps(result))


def alternated(step, sync, soft, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds of a plain step and of a distilled one (``soft``), timed in turn, after each kind's
    warm-up at full size."""
    for _ in range(warmup):
        step()
        step(soft)
    sync()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for distilled in (False, True):
            t0 = time.perf_counter()
            step(soft if distilled else None)
            sync()
            times[distilled].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def random_soft_labels(batch: int, block: int, k: int, vocab: int, device: torch.device):
    """A teacher's top k at every target: distinct random ids, log-probabilities summing below 1 (the rest
    bucket non-empty), as prepared shards hold them."""
    from scratchlm.model.soft_labels import SoftLabels

    stride = vocab // k  # k ids a row, spread so that they never collide
    ids = (torch.randint(0, vocab, (batch, block, 1), device=device)
           + stride * torch.arange(k, device=device)) % vocab
    logprobs = torch.log_softmax(torch.randn(batch, block, k + 1, device=device), dim=-1)[..., :k]
    return SoftLabels(ids, logprobs, torch.ones(batch, block, dtype=torch.bool, device=device))


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
    p.add_argument("--distill", type=int, default=0, metavar="K",
                   help="also time our distilled step with a teacher's top K at every position")
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
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0] if m != "impl"}
           for k, v in results.items()}
    ratio = med["ours"]["tokens_per_s"] / med["transformers"]["tokens_per_s"]
    compiled = " compiled" if args.compile else ""
    print(f"\n{args.model} {args.device} {args.precision} batch {args.batch}x{args.block}{compiled}: "
          f"median of {args.repeats} runs × {args.steps} steps")
    print(f"{'':>14} {'tokens/s':>12} {'peak GiB':>9} {'MFU':>6}")
    for k, v in med.items():
        mfu_text = f"{v['mfu']:.1%}" if "mfu" in v else "-"
        print(f"{k:>14} {v['tokens_per_s']:>12,.0f} {v['peak_mem_gib']:>9.2f} {mfu_text:>6}")
    print(f"ratio ours/transformers: {ratio:.3f}")

    def side(name: str) -> str:
        v = med[name]
        return (f"{name} {v['tokens_per_s']:,.0f} tok/s {v['peak_mem_gib']:.1f} GiB"
                + (f" MFU {v['mfu']:.1%}" if "mfu" in v else ""))

    print(f"RESULT train {args.model} {args.batch}x{args.block} {args.precision}{compiled}: "
          f"{side('ours')}, {side('transformers')}, ratio {ratio:.3f}")
    if args.distill:
        d = med["ours"]["distill_tokens_per_s"]
        print(f"RESULT distill step {args.model} {args.batch}x{args.block} {args.precision}{compiled} top "
              f"{args.distill}: {d:,.0f} tok/s, {d / med['ours']['tokens_per_s']:.2f}x our plain step")

if __name__ == "__main__":
    main()
