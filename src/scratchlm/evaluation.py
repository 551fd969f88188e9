"""``scratchlm eval``: token-level loss, perplexity and bits per byte of a causal LM on text.

Protocol (the one behind Phi-2's published WikiText-2 perplexity of 9.705): the documents are joined into one
token stream (here with ``<|endoftext|>`` between them, as in training) and cut into non-overlapping windows
of ``block_size`` tokens; every token but each window's first is predicted from the tokens before it in its
window. Loss is the mean over predicted tokens (nats), perplexity its exponential, and bits per byte the total
loss in bits over the UTF-8 bytes of the text.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm import tqdm

from .config import Count, DeviceSpec
from .data import DataError, held_out_documents, iter_documents
from .data.reading import CorpusReading
from .devices import pick_device
from .files import atomic_write
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("scratchlm.eval")

EVAL_BATCH_SIZE = 4
"""Windows evaluated together (eval --batch-size, and the library's default)."""


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    block_size: int | None = None
    """The window length used (a model's context caps what was asked)."""

    def to_dict(self) -> dict:
        return asdict(self)


def load_causal_lm(path_or_hub_id: str, device: torch.device, dtype: torch.dtype | None = None):
    """(forward(idx) → logits, model) for a Hugging Face folder or hub id: Phi on our model, others on
    transformers."""
    from .model.hf import load_hf, resolve_model_dir

    model_dir = resolve_model_dir(path_or_hub_id)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type == "phi":
        model = load_hf(str(model_dir), device=device, dtype=dtype).eval()
        return model, model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return (lambda idx: model(input_ids=idx, use_cache=False).logits), model


def context_length(model) -> int | None:
    """The most positions a loaded model (ours or a transformers one) attends over, if it says."""
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None) or getattr(config, "max_position_embeddings", None)


def window_for(model, block_size: int, name: str) -> int:
    """``block_size``, or the model's context where that is shorter (said in the log: a window longer than
    the context has no meaning for the model)."""
    context = context_length(model)
    if context is not None and block_size > context:
        log.warning("block size %d is beyond %s's context of %d positions: evaluating in windows of %d",
                    block_size, name, context, context)
        return context
    return block_size


@torch.no_grad()
def evaluate_texts(forward, texts: Sequence[str], tokenizer: Tokenizer, block_size: int, device: torch.device,
                   batch_size: int = EVAL_BATCH_SIZE, max_tokens: int | None = None,
                   progress: bool = True) -> EvalResult:
    """Loss over non-overlapping windows of ``block_size`` tokens of the joined texts."""
    stream = torch.from_numpy(tokenizer.encode_documents(list(texts)))
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if len(stream) < 2:
        raise ValueError("the text has fewer than two tokens: nothing to predict")
    # Bytes of the text these tokens stand for (decoding the evaluated tokens counts a truncated stream
    # right).
    n_bytes = len(tokenizer.decode(stream.tolist()).encode("utf-8"))
    windows = list(stream.split(block_size))
    total_nats, predicted = 0.0, 0
    bar = tqdm(total=len(stream), unit="tok", unit_scale=True, desc="evaluating",
               disable=not progress or None)
    # Full windows go in batches; the last, shorter one on its own.
    full = [w for w in windows if len(w) == block_size]
    rest = [w for w in windows if len(w) != block_size and len(w) > 1]
    for group in [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]:
        idx = torch.stack(group).to(device)
        logits = forward(idx[:, :-1]).float()
        total_nats += F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="sum").item()
        predicted += idx[:, 1:].numel()
        bar.update(idx.numel())
    bar.close()
    loss = total_nats / predicted
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=total_nats / math.log(2) / n_bytes,
                      tokens=predicted)


def evaluate_model(model: str, texts: Sequence[str], tokenizer: Tokenizer, block_size: int,
                   device: torch.device, batch_size: int = EVAL_BATCH_SIZE, max_tokens: int | None = None,
                   progress: bool = False) -> EvalResult:
    """``evaluate_texts`` for a model folder or hub id (bf16 on a GPU, float32 on the CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    forward, loaded = load_causal_lm(model, device, dtype)
    window = window_for(loaded, block_size, model)
    result = evaluate_texts(forward, texts, tokenizer, window, device, batch_size, max_tokens, progress)
    result.block_size = window
    return result


WHOLE = CorpusReading(chunk_chars=10**9)
"""Documents read uncut (evaluation joins them into one stream)."""


def whole_documents(data: str) -> list[str]:
    """Every document of a corpus, uncut: evaluation joins them into one stream."""
    return [t for _, t in iter_documents(data, WHOLE)]


class EvalConfig(CorpusReading):
    """Loss, perplexity and bits per byte of a causal LM on text, over non-overlapping windows."""

    model: str
    """Hugging Face folder or hub id (ours, microsoft/phi-2, ...)."""
    data: str
    """Text: folder, .zip, .txt, .jsonl(.gz), .parquet."""
    split: Literal["held-out", "all"] = "held-out"
    """held-out: the documents a training run on --data holds out (with the same --eval-fraction and
    --chunk-chars), the set every run is compared on; all: every document of --data (a file of held-out text
    written out, or another corpus)."""
    write_documents: str | None = None
    """Also write the documents evaluated on to this .jsonl file (one {"text": ...} a line): the held-out
    split as a file, to evaluate other models on (--split all) or to share."""
    block_size: Annotated[int, Field(ge=2)] = 2048
    """Window length in tokens."""
    batch_size: Count = EVAL_BATCH_SIZE
    """Windows per forward pass."""
    max_tokens: Annotated[int, Field(ge=2)] | None = None
    """Evaluate only the first N tokens."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: $SCRATCHLM_TOKENIZER)."""
    device: DeviceSpec = "auto"
    """auto, cpu, cuda or cuda:N."""
    as_json: bool = Field(False, alias="json")
    """Print {"loss", "perplexity", "bits_per_byte", "tokens"} as JSON."""


def evaluate_config(cfg: EvalConfig) -> EvalResult:
    """What ``scratchlm eval`` measures (the Python API's ``evaluate``)."""
    held_out = cfg.split == "held-out"
    texts = (held_out_documents(cfg.data, cfg.part(CorpusReading)) if held_out
             else whole_documents(cfg.data))
    if not texts:
        raise DataError(f"{cfg.data} has no held-out documents at --eval-fraction {cfg.eval_fraction}: use "
                        "--split all to evaluate on all of it")
    if cfg.write_documents:
        atomic_write(cfg.write_documents, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return evaluate_model(cfg.model, texts, load_tokenizer(cfg.tokenizer), cfg.block_size,
                          pick_device(cfg.device), cfg.batch_size, cfg.max_tokens,
                          progress=sys.stderr.isatty())


def run_eval(cfg: EvalConfig) -> None:
    result = evaluate_config(cfg)
    if cfg.as_json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{cfg.model} on {cfg.data} ({cfg.split}): loss {result.loss:.4f} nats/token, perplexity "
              f"{result.perplexity:.3f}, {result.bits_per_byte:.4f} bits/byte over {result.tokens:,} tokens "
              f"(windows of {result.block_size})")
