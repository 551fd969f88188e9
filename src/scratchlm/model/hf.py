"""Exact conversion between our ``Phi`` and Hugging Face ``transformers``' ``PhiForCausalLM`` format.

A Hugging Face folder is ``config.json`` + ``model.safetensors`` (or shards with an index), the layout that
``PhiForCausalLM.from_pretrained`` and ``microsoft/phi-2`` use. Only safetensors are read: no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..files import atomic_file, atomic_write
from .config import PHI2_TOKENIZER_SIZE, ModelConfig
from .model import Phi

HF_WEIGHTS = "model.safetensors"
EOT_ID = 50256
HF_INDEX = "model.safetensors.index.json"


class CheckpointError(UserError, RuntimeError):
    """A model folder or hub id could not be read as a Phi checkpoint."""


def unwrap(model: torch.nn.Module) -> Phi:
    """The plain ``Phi`` inside DDP / ``torch.compile`` wrappers, so saved keys never carry their prefixes."""
    while not isinstance(model, Phi):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a Phi model, got {type(model).__name__}")
        model = inner
    return model


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for ``PhiForCausalLM`` (keys understood by transformers 4.x and 5.x alike)."""
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "max_position_embeddings": cfg.block_size,
        "partial_rotary_factor": cfg.rotary_pct,
        "rope_theta": cfg.rope_base,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "gelu_new",  # transformers' name for GELU with the tanh approximation
        "initializer_range": cfg.init_std,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        # Phi-2's <|endoftext|> is both; a toy vocabulary without it gets none.
        "bos_token_id": EOT_ID if cfg.padded_vocab_size > EOT_ID else None,
        "eos_token_id": EOT_ID if cfg.padded_vocab_size > EOT_ID else None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "scratchlm_name": cfg.name,
    }


def config_from_hf(hf: dict, name: str | None = None) -> ModelConfig:
    """Our ``ModelConfig`` from a Phi ``config.json`` (transformers 4.x keys or 5.x ``rope_parameters``)."""
    if hf.get("model_type") != "phi":
        raise CheckpointError(f"not a Phi checkpoint (model_type={hf.get('model_type')!r})")
    if hf.get("qk_layernorm"):
        raise CheckpointError("Phi checkpoints with qk_layernorm are not supported")
    rope = hf.get("rope_parameters") or {}
    n_head = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", n_head) != n_head:
        raise CheckpointError("grouped-query Phi checkpoints are not supported")
    padded = hf["vocab_size"]
    return ModelConfig(
        name=name or hf.get("scratchlm_name") or "hf",
        vocab_size=min(PHI2_TOKENIZER_SIZE, padded),
        padded_vocab_size=padded,
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=n_head,
        intermediate_size=hf["intermediate_size"],
        rotary_pct=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
        rope_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        block_size=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )


def _key_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(our key, HF key) for every tensor but the fused QKV, which ``to_hf_state_dict`` splits."""
    yield "embed.weight", "model.embed_tokens.weight"
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for p in ("weight", "bias"):
            yield ours + f"norm.{p}", theirs + f"input_layernorm.{p}"
            yield ours + f"attn.proj.{p}", theirs + f"self_attn.dense.{p}"
            yield ours + f"mlp.fc1.{p}", theirs + f"mlp.fc1.{p}"
            yield ours + f"mlp.fc2.{p}", theirs + f"mlp.fc2.{p}"
    for p in ("weight", "bias"):
        yield f"final_norm.{p}", f"model.final_layernorm.{p}"
        yield f"lm_head.{p}", f"lm_head.{p}"


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = unwrap(model)
    ours = model.state_dict()
    out = {theirs: ours[mine] for mine, theirs in _key_pairs(model.config)}
    for i in range(model.config.n_layer):
        for p in ("weight", "bias"):
            q, k, v = ours[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[f"model.layers.{i}.self_attn.{name}_proj.{p}"] = t
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    expected = {theirs for _, theirs in _key_pairs(cfg)}
    expected |= {f"model.layers.{i}.self_attn.{n}_proj.{p}" for i in range(cfg.n_layer) for n in "qkv"
                 for p in ("weight", "bias")}
    missing, unexpected = expected - hf.keys(), hf.keys() - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint keys do not match a Phi model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    out = {mine: hf[theirs] for mine, theirs in _key_pairs(cfg)}
    for i in range(cfg.n_layer):
        for p in ("weight", "bias"):
            parts = [hf[f"model.layers.{i}.self_attn.{n}_proj.{p}"] for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts, dim=0)
    return out


def phi_from_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Phi:
    """A ``Phi`` holding the given weights (our keys), without allocating a second copy."""
    with torch.device("meta"):
        model = Phi(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    model.reset_rope()  # rotary tables are not stored; rebuild them off the meta device
    return model


TRAINED_BLOCK_KEY = "scratchlm_trained_block_size"
"""config.json's record of the sequence length a model was trained at (its positions beyond were never
trained: a teacher scores in windows of it); transformers keeps it as an attribute and ignores it."""


def save_hf(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
            trained_block_size: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors``, which ``PhiForCausalLM.from_pretrained`` loads
    strictly; ``trained_block_size``, where known, is recorded in the config."""
    model = unwrap(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k,
               v in to_hf_state_dict(model).items()}
    actual_dtype = next(iter(tensors.values())).dtype
    config = hf_config(model.config, actual_dtype)
    if trained_block_size is not None:
        config[TRAINED_BLOCK_KEY] = trained_block_size
    atomic_write(out_dir / "config.json", json.dumps(config, indent=2))
    with atomic_file(out_dir / HF_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return out_dir


def resolve_model_dir(path_or_hub_id: str) -> Path:
    """A local folder as is; otherwise a hub id fetched (config + safetensors only) into the HF cache."""
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_hub_id.startswith((".", "/", "~")) or path_or_hub_id.count("/") != 1:
        raise CheckpointError(f"no model folder at '{path_or_hub_id}' "
                              "(and it is not a hub id like 'microsoft/phi-2')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # network errors, missing repos and auth errors all end here
        raise CheckpointError(f"could not fetch '{path_or_hub_id}' from the Hugging Face hub: "
                              f"{err}") from None


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors`` or of the shards its index names."""
    if (model_dir / HF_INDEX).exists():
        index = json.loads((model_dir / HF_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (model_dir / HF_WEIGHTS).exists():
        files = [HF_WEIGHTS]
    else:
        raise CheckpointError(f"{model_dir} holds no {HF_WEIGHTS} (only safetensors checkpoints are read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def load_hf(path_or_hub_id: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Phi:
    """Our ``Phi`` with the weights of a Hugging Face Phi folder or hub id (ours or ``microsoft/phi-2``)."""
    model_dir = resolve_model_dir(path_or_hub_id)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{model_dir} has no config.json")
    cfg = config_from_hf(json.loads(config_path.read_text()))
    model = phi_from_weights(cfg, from_hf_state_dict(read_safetensors(model_dir), cfg))
    return model.to(device=device, dtype=dtype)
