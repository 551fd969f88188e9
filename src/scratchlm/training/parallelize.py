"""Everything that wraps the single-device model, in one place and one fixed order.

Order (as torchtitan): activation checkpointing per block, then ``torch.compile`` per block (in place, so
parameter names and checkpoint keys do not change), then data parallelism: DDP, or FSDP2 (``fully_shard`` per
block, then the root) with bf16 parameters and an fp32 gradient reduction if asked.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from ..model.model import Phi

Strategy = Literal["auto", "single", "ddp", "fsdp"]
FSDP_AUTO_PARAMETERS = 1_000_000_000
"""With --strategy auto and several processes: FSDP from this many parameters up (a replica's AdamW state, 16
bytes per parameter, stops fitting comfortably), DDP below."""


def resolve_strategy(strategy: Strategy, world_size: int, num_parameters: int) -> str:
    if strategy == "auto":
        if world_size == 1:
            return "single"
        return "fsdp" if num_parameters >= FSDP_AUTO_PARAMETERS else "ddp"
    if strategy == "single" and world_size > 1:
        raise ValueError("--strategy single with several processes: use ddp or fsdp")
    return strategy


def gradient_sync(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's backward: gradients are reduced across ranks only after the last micro-batch of
    an optimizer step (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``), not after every one."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def parallelize(model: Phi, activation_checkpointing: bool = False, compile: bool = False,
                strategy: str = "single",
                device: torch.device | None = None, param_dtype: torch.dtype | None = None,
                reduce_fp32: bool = True) -> torch.nn.Module:
    if activation_checkpointing:
        for i, block in enumerate(model.blocks):
            # Recompute each block's activations in backward: memory O(layers) instead of O(layers ×
            # activations).
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in model.blocks:
            block.compile()  # in place: keys stay "blocks.N...." with no "_orig_mod."
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Our buffers (rotary tables) are computed identically everywhere: no need to broadcast them each
        # step.
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                                  reduce_dtype=torch.float32 if reduce_fp32 else param_dtype)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model
