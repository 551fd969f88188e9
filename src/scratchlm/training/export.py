"""``scratchlm export``: any training checkpoint as a Hugging Face folder (a preempted run has no
``final/``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from ..config import ConfigBase, ConfigError, read_yaml


class ExportConfig(ConfigBase):
    """Write a training checkpoint (RUN/checkpoints/step-N) as a Hugging Face folder that
    transformers.PhiForCausalLM.from_pretrained loads, with the tokenizer beside it."""

    positional: ClassVar[tuple[str, ...]] = ("checkpoint",)
    checkpoint: str
    """The checkpoint folder (RUN/checkpoints/step-N), or a run folder (its newest checkpoint that
    verifies)."""
    out: str
    """Folder to write."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the stored weights."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id to copy beside the weights (default: $SCRATCHLM_TOKENIZER, else
    microsoft/phi-2)."""
    overwrite: bool = False
    """Write into an --out that already holds files: the model files there (weights, sharded weights and
    their index, configs, tokenizer), which a loader might read instead, are removed first."""


# What a Hugging Face loader may read from a model folder: an old export's files must not outlive it (a
# sharded checkpoint's index is preferred to a single model.safetensors written beside it).
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model*.bin.index.json", "config.json", "generation_config.json", "tokenizer*.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Check ``out`` can take an export: a folder, creatable, empty unless ``overwrite`` (which clears the
    model files a loader would find there). Every failure is one line naming the path."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        more = " ..." if len(held) > 5 else ""
        raise ConfigError(f"--out {out} already holds {', '.join(held[:5])}{more}: give --overwrite to "
                          "replace the model there, or another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in MODEL_FILES if held else ():
            for old in out.glob(pattern):
                old.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to {err.filename or out}: {err.strerror}") from None


def run_export(cfg: ExportConfig) -> Path:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..model.hf import phi_from_weights, save_hf
    from ..tokenizer import load_tokenizer
    from . import checkpoint as ckpt
    from .config import TrainConfig

    path = Path(cfg.checkpoint)
    if not (path / "state.json").exists():  # a run folder: its newest checkpoint that can be trusted
        path, _ = ckpt.latest_verified(path)
        if path is None:
            raise ConfigError(f"{cfg.checkpoint} is neither a checkpoint nor a run folder with one")
    elif (reason := ckpt.verify(path)) is not None:
        raise ConfigError(f"{path} cannot be trusted: {reason}")
    run_cfg = TrainConfig.model_validate(read_yaml(path / "config.yaml"))
    model_cfg = run_cfg.preset()
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as err:  # a checkpoint without a manifest, its file cut short
        raise ConfigError(f"{path / 'model.safetensors'} cannot be read: {err}") from None
    model = phi_from_weights(model_cfg, weights)
    tokenizer = load_tokenizer(cfg.tokenizer)  # before anything is removed or written
    _prepare_out(Path(cfg.out), cfg.overwrite)
    try:
        out = save_hf(model, cfg.out, dtype=getattr(torch, cfg.dtype),
                      trained_block_size=run_cfg.resolved_block_size())
        tokenizer.save(out)
    except OSError as err:
        raise ConfigError(f"cannot write to {err.filename or cfg.out}: {err.strerror}") from None
    print(f"wrote {path} ({model_cfg.name}) to {out} (Hugging Face format, {cfg.dtype})")
    return out
