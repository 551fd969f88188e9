"""The ``scratchlm`` command: one subcommand per workflow, each declared the same way
(``config.add_command``): a typed config whose fields are its flags, and a function that runs it.

Only the module of the command being run is imported, so ``scratchlm model-info`` does not load torch's
distributed stack. Known failures (a ``UserError``: bad config, missing tokenizer, unreadable checkpoint or
corpus) end with one clear line and exit status 2, not a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from .config import ConfigBase, Count, add_command
from .errors import UserError
from .model.config import PRESETS, get_preset


@dataclass(frozen=True)
class Command:
    help: str
    module: str
    """Where the config class and run function live (imported when this command runs)."""
    config: str
    run: str


COMMANDS: dict[str, Command] = {
    "demo": Command("the whole project end to end on a CPU: what a teacher's text and its knowledge buy, "
                    "each against its control",
                    "scratchlm.demo", "DemoConfig", "run_demo"),
    "train": Command("pretrain a model from random weights",
                     "scratchlm.training.trainer", "TrainConfig", "run_train"),
    "prepare": Command("tokenize a corpus into the cache (and score it with a teacher) before training",
                       "scratchlm.preparation", "PrepareConfig", "run_prepare"),
    "export": Command("write any training checkpoint as a Hugging Face folder",
                      "scratchlm.training.export", "ExportConfig", "run_export"),
    "serve": Command("serve corpus texts over HTTP (the data feed)",
                     "scratchlm.feed.server", "ServeConfig", "run_serve"),
    "serve-model": Command("serve a model through an OpenAI-compatible /v1/completions",
                           "scratchlm.teacher.serve_model", "ServeModelConfig", "serve_model"),
    "generate": Command("sample text from a model (a quick look)",
                        "scratchlm.teacher.commands", "GenerateConfig", "run_generate"),
    "build-corpus": Command("generate a clean corpus with a teacher into a sample.zip",
                            "scratchlm.teacher.commands", "BuildCorpusConfig", "run_build_corpus"),
    "eval": Command("loss, perplexity and bits per byte of a model on text",
                    "scratchlm.evaluation", "EvalConfig", "run_eval"),
    "report": Command("plots, tables and 'how much more training' for one or more runs",
                      "scratchlm.reporting.command", "ReportConfig", "run_report"),
    "init": Command("write a randomly initialised model in Hugging Face format",
                    "scratchlm.cli", "InitConfig", "run_init"),
    "model-info": Command("parameter counts and FLOPs per token of a preset",
                          "scratchlm.cli", "ModelInfoConfig", "run_model_info"),
}


class ModelInfoConfig(ConfigBase):
    """Parameter counts and training FLOPs per token of a preset, or the list of presets."""

    positional: ClassVar[tuple[str, ...]] = ("name",)
    name: str | None = None
    """Preset name (see --list)."""
    list: bool = False
    """List the presets."""
    seq_len: Count | None = None
    """Sequence length T for the FLOPs (default: the model's block size)."""


def run_model_info(cfg: ModelInfoConfig) -> None:
    if cfg.list or not cfg.name:
        print(f"{'preset':<10} {'layers':>6} {'d_model':>7} {'heads':>5} {'mlp':>6} {'rotary':>6} "
              f"{'block':>5} {'parameters':>15} {'non-embedding':>15} {'FLOPs/token':>15}")
        for c in PRESETS.values():
            print(f"{c.name:<10} {c.n_layer:>6} {c.n_embd:>7} {c.n_head:>5} {c.intermediate_size:>6} "
                  f"{c.rotary_pct:>6} {c.block_size:>5} {c.num_parameters:>15,} "
                  f"{c.num_non_embedding_parameters:>15,} {c.flops_per_token():>15,.0f}")
        return
    c = get_preset(cfg.name)
    seq = cfg.seq_len or c.block_size
    print(f"model:                     {c.name}")
    print(f"layers / d_model / heads:  {c.n_layer} / {c.n_embd} / {c.n_head} (head size {c.head_size}, "
          f"rotary dims {c.rotary_dim})")
    print(f"MLP width:                 {c.intermediate_size}")
    print(f"vocabulary:                {c.vocab_size} ids, padded to {c.padded_vocab_size}")
    print(f"parameters:                {c.num_parameters:,}")
    print(f"non-embedding parameters:  {c.num_non_embedding_parameters:,} (no embedding, no LM head)")
    print(f"training FLOPs per token:  {c.flops_per_token(seq):,.0f} "
          f"(6·N + 12·L·d·T with N={c.num_parameters:,}, L={c.n_layer}, d={c.n_embd}, T={seq})")


class InitConfig(ConfigBase):
    """Write a randomly initialised model (and Phi-2's tokenizer) as a Hugging Face folder."""

    model: str
    """Preset name (see scratchlm model-info --list)."""
    out: str
    """Output folder."""
    seed: int = 1337
    """Random seed (the seed project's)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the stored weights."""


def run_init(cfg: InitConfig) -> None:
    import torch

    from .model.hf import save_hf
    from .model.model import Phi
    from .tokenizer import TokenizerNotFound, load_tokenizer

    model_cfg = get_preset(cfg.model)
    torch.manual_seed(cfg.seed)
    out = save_hf(Phi(model_cfg), cfg.out, dtype=getattr(torch, cfg.dtype))
    try:
        load_tokenizer().save(out)
        extra = " and Phi-2's tokenizer"
    except TokenizerNotFound as err:
        extra = f" (no tokenizer copied: {err})"
    print(f"wrote {model_cfg.name} ({model_cfg.num_parameters:,} parameters, random init, seed {cfg.seed})"
          f"{extra} to {out}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command``'s subparser complete with its flags, the others by name and help only."""
    parser = argparse.ArgumentParser(
        prog="scratchlm", description="Pretrain a small Phi-style language model from random weights: feed "
        "server, trainer, teacher, evaluation and reports. Start with: scratchlm demo")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if name == command:
            module = importlib.import_module(cmd.module)
            add_command(sub, name, getattr(module, cmd.config), getattr(module, cmd.run), cmd.help)
        else:
            sub.add_parser(name, help=cmd.help, add_help=False)
    return parser


def config_of(argv: Sequence[str]) -> ConfigBase:
    """The validated config a command line (``train --max-steps 10 ...``, without ``scratchlm``) gives its
    command, without running it: how the tests check every command the README documents."""
    args = build_parser(argv[0]).parse_args(argv)
    return args.config_of(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Libraries the commands import (torch, when dill is installed) write to a temporary folder as they
        # are imported: on a full disk, say so rather than end in their traceback.
        tempfile.gettempdir()
    except OSError as err:
        print(f"scratchlm: error: cannot write to a temporary folder ({err.strerror}): is the disk full?",
              file=sys.stderr)
        return 2
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        status = getattr(err, "exit_status", 2)  # a stop on request (SIGTERM) has its own, and is no error
        print(f"scratchlm {args.command}: {'error: ' if status == 2 else ''}{err}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print(f"scratchlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
