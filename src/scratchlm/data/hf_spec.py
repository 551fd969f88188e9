"""Hugging Face dataset corpora as a data setting names them: ``hf:NAME[:CONFIG][@SPLIT]``."""

HF_PREFIX = "hf:"


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` → (name, config, split); the split is 'train' when not given."""
    rest, _, split = spec.removeprefix(HF_PREFIX).partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or "train"
