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


def run_export(cfg: ExportConfig) -> Path:
    import torch
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
    model_cfg = TrainConfig.model_validate(read_yaml(path / "config.yaml")).preset()
    model = phi_from_weights(model_cfg, load_file(str(path / "model.safetensors")))
    out = save_hf(model, cfg.out, dtype=getattr(torch, cfg.dtype))
    load_tokenizer(cfg.tokenizer).save(out)
    print(f"wrote {path} ({model_cfg.name}) to {out} (Hugging Face format, {cfg.dtype})")
    return out
