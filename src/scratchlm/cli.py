"""The ``scratchlm`` command: one subcommand per workflow, each module owning its flags.

Known failures (bad config, missing tokenizer, unreadable checkpoint or corpus) end with one clear line and exit
status 2, not a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .checkpoint import CheckpointWriteError
from .config import ConfigError
from .data import DataError
from .model.config import PRESETS, get_preset
from .model.hf import CheckpointError
from .tokenizer import TokenizerNotFound

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, TokenizerNotFound, CheckpointError, DataError,
                                                 CheckpointWriteError)


def cmd_model_info(args: argparse.Namespace) -> None:
    if args.list or not args.name:
        print(f"{'preset':<10} {'layers':>6} {'d_model':>7} {'heads':>5} {'mlp':>6} {'rotary':>6} "
              f"{'block':>5} {'parameters':>15} {'non-embedding':>15}")
        for c in PRESETS.values():
            print(f"{c.name:<10} {c.n_layer:>6} {c.n_embd:>7} {c.n_head:>5} {c.intermediate_size:>6} "
                  f"{c.rotary_pct:>6} {c.block_size:>5} {c.num_parameters:>15,} {c.num_non_embedding_parameters:>15,}")
        return
    c = get_preset(args.name)
    seq = args.seq_len or c.block_size
    print(f"model:                     {c.name}")
    print(f"layers / d_model / heads:  {c.n_layer} / {c.n_embd} / {c.n_head} (head size {c.head_size}, "
          f"rotary dims {c.rotary_dim})")
    print(f"MLP width:                 {c.intermediate_size}")
    print(f"vocabulary:                {c.vocab_size} ids, padded to {c.padded_vocab_size}")
    print(f"parameters:                {c.num_parameters:,}")
    print(f"non-embedding parameters:  {c.num_non_embedding_parameters:,}")
    print(f"training FLOPs per token:  {c.flops_per_token(seq):,.0f} "
          f"(6·N + 12·L·d·T with N={c.num_parameters:,}, L={c.n_layer}, d={c.n_embd}, T={seq})")


def cmd_init(args: argparse.Namespace) -> None:
    from .model.hf import save_hf
    from .model.model import Phi
    from .tokenizer import load_tokenizer

    cfg = get_preset(args.model)
    torch.manual_seed(args.seed)
    model = Phi(cfg)
    out = save_hf(model, args.out, dtype=getattr(torch, args.dtype))
    try:
        load_tokenizer().save(out)
        extra = " and Phi-2's tokenizer"
    except TokenizerNotFound as err:
        extra = f" (no tokenizer copied: {err})"
    print(f"wrote {cfg.name} ({cfg.num_parameters:,} parameters, random init, seed {args.seed}){extra} to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm", description="Pretrain a small Phi-style language model from random weights: feed server, "
        "trainer, teacher, evaluation and reports. Start with: scratchlm demo")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="parameter counts and FLOPs per token of a preset")
    p.add_argument("name", nargs="?", help="preset name (see --list)")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length T for the FLOPs (default: block size)")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("init", help="write a randomly initialised model in Hugging Face format")
    p.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337, the seed's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(func=cmd_init)

    from . import demo, evaluation, reporting, trainer
    from .feed import server
    from .teacher import commands as teacher_commands

    trainer.add_parser(sub)
    server.add_parser(sub)
    teacher_commands.add_parsers(sub)
    evaluation.add_parser(sub)
    reporting.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"scratchlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scratchlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
