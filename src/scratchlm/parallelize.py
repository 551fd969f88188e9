"""Everything that wraps the single-device model, in one place and one fixed order.

Order (as torchtitan): activation checkpointing per block, then ``torch.compile`` per block (in place, so
parameter names and checkpoint keys do not change), then data parallelism.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from .model.model import Phi


def parallelize(model: Phi, activation_checkpointing: bool = False, compile: bool = False) -> torch.nn.Module:
    if activation_checkpointing:
        for i, block in enumerate(model.blocks):
            # Recompute each block's activations in backward: memory O(layers) instead of O(layers × activations).
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        for block in model.blocks:
            block.compile()  # in place: keys stay "blocks.N...." with no "_orig_mod."
    return model
