"""The Phi model family's configuration and its presets.

Presets are code, each a plain ``ModelConfig``; sizes that follow from the fields (head size, rotary dims,
parameter counts) are derived here once and checked, so no caller recomputes them.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import ConfigDict, model_validator

from ..config import ConfigBase, ConfigError

MAX_PARAMETERS = 3_000_000_000
"""scratchlm is for models under 3B parameters; larger configs are refused."""

PHI2_TOKENIZER_SIZE = 50295
"""Ids in Phi-2's tokenizer (50257 GPT-2 BPE ids + 38 whitespace tokens)."""


class ModelConfig(ConfigBase):
    """A Phi-architecture decoder: parallel attention + MLP sharing one LayerNorm, partial rotary, biases."""

    # Frozen: the derived sizes below are computed once and must not go stale; use ``replace`` to vary one.
    model_config = ConfigDict(**ConfigBase.model_config, frozen=True)

    name: str = "custom"
    """Preset name, or any label for a custom config."""
    vocab_size: int = PHI2_TOKENIZER_SIZE
    """Token ids the tokenizer produces (Phi-2: 50295)."""
    padded_vocab_size: int = 51200
    """Rows of the embedding and LM head; padded above vocab_size so the matrices tile well (Phi-2: 51200)."""
    n_layer: int = 32
    """Transformer blocks."""
    n_embd: int = 2560
    """Model (residual stream) width."""
    n_head: int = 32
    """Attention heads; n_embd must divide by it."""
    intermediate_size: int = 10240
    """MLP hidden width (fc1 output)."""
    rotary_pct: float = 0.4
    """Share of each head's dims that get rotary embedding (Phi-2: 0.4, Phi-1.5: 0.5)."""
    rope_base: float = 10000.0
    """Rotary embedding base (theta)."""
    block_size: int = 2048
    """Longest sequence the model supports (max_position_embeddings)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (see Phi.init_weights)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dims per head ({self.rotary_dim}) must be even; adjust rotary_pct")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError("rotary_pct must lie in [0, 1]")
        if self.num_parameters > MAX_PARAMETERS:
            raise ValueError(
                f"{self.num_parameters:,} parameters is over scratchlm's limit of {MAX_PARAMETERS:,} (3B); "
                "use fewer layers or a narrower model"
            )
        return self

    def replace(self, **changes) -> ModelConfig:
        """A validated copy with some fields changed."""
        return ModelConfig.model_validate({**self.model_dump(), **changes})

    @cached_property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @cached_property
    def rotary_dim(self) -> int:
        """Per-head dims that are rotated, as transformers computes it: int(head_size * rotary_pct)."""
        return int(self.head_size * self.rotary_pct)

    @cached_property
    def num_embedding_parameters(self) -> int:
        """The vocabulary's matrices: token embedding and LM head (with its bias). Kaplan et al. 2020 leave
        them out of N (their models tie the two); at phi-tiny's width they are 94% of the model, at Phi-2's
        9%."""
        return 2 * self.padded_vocab_size * self.n_embd + self.padded_vocab_size

    @cached_property
    def num_parameters(self) -> int:
        d, f, v = self.n_embd, self.intermediate_size, self.padded_vocab_size
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return v * d + self.n_layer * block + 2 * d + (d * v + v)

    @cached_property
    def num_non_embedding_parameters(self) -> int:
        """The blocks and the final LayerNorm: Kaplan et al.'s N, the count their laws are smooth in."""
        return self.num_parameters - self.num_embedding_parameters

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N + 12·L·d·T (nanoGPT/litgpt convention, N = all parameters)."""
        t = self.block_size if seq_len is None else seq_len
        return 6 * self.num_parameters + 12 * self.n_layer * self.n_embd * t


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(name="phi-2", n_layer=32, n_embd=2560, n_head=32, intermediate_size=10240,
                    rotary_pct=0.4),
        ModelConfig(name="phi-1.5", n_layer=24, n_embd=2048, n_head=32, intermediate_size=8192,
                    rotary_pct=0.5),
        # Small presets keep Phi-2's vocabulary and head layout ratios, for CPU work, tests and the demo.
        ModelConfig(name="phi-100m", n_layer=12, n_embd=576, n_head=9, intermediate_size=2304,
                    rotary_pct=0.5),
        ModelConfig(name="phi-20m", n_layer=6, n_embd=256, n_head=8, intermediate_size=1024, rotary_pct=0.5,
                    block_size=1024),
        ModelConfig(name="phi-tiny", n_layer=4, n_embd=128, n_head=4, intermediate_size=512, rotary_pct=0.5,
                    block_size=512),
        # The model-size ladder below phi-tiny (bench/ladder.py): its shape (head size 32 or less, MLP 4x)
        # scaled down in width and depth, so that with phi-tiny the non-embedding parameters span 14x on sizes
        # a 2-core CPU trains in minutes.
        ModelConfig(name="phi-d48", n_layer=2, n_embd=48, n_head=2, intermediate_size=192, rotary_pct=0.5,
                    block_size=512),
        ModelConfig(name="phi-d64", n_layer=2, n_embd=64, n_head=2, intermediate_size=256, rotary_pct=0.5,
                    block_size=512),
        ModelConfig(name="phi-d96", n_layer=3, n_embd=96, n_head=3, intermediate_size=384, rotary_pct=0.5,
                    block_size=512),
    ]
}


def get_preset(name: str) -> ModelConfig:
    """A preset by name; an unknown name is a ``ConfigError`` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; presets are: {', '.join(PRESETS)}") from None
