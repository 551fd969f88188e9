"""Gradient accumulation under DDP and FSDP2 (gloo, 2 processes): gradients are reduced once per optimizer
step, after the last micro-batch, not after every one; the result is the same."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scratchlm.model.config import ModelConfig
from scratchlm.model.model import Phi
from scratchlm.training.parallelize import gradient_sync, parallelize

pytestmark = pytest.mark.slow
TINY = ModelConfig(name="sync-test", n_layer=2, n_embd=32, n_head=2, intermediate_size=64, block_size=16,
                   vocab_size=300, padded_vocab_size=320)
ACCUM, STEPS = 4, 2


def _worker(rank: int, port: int, strategy: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = parallelize(Phi(TINY), strategy=strategy)
    reductions = {"count": 0}
    if strategy == "ddp":
        def counting(state, bucket):  # a comm hook: every all-reduce of a gradient bucket passes here
            reductions["count"] += 1
            return dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(
                lambda f: f.value()[0])
        model.register_comm_hook(None, counting)
    else:  # FSDP2: count the reduce-scatters its post-backward issues (through torch.distributed)
        real = dist.reduce_scatter_single

        def counted(*args, **kwargs):
            reductions["count"] += 1
            return real(*args, **kwargs)
        dist.reduce_scatter_single = counted
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        for micro in range(ACCUM):
            idx = torch.randint(0, 300, (2, 17), generator=g)
            with gradient_sync(model, last=micro == ACCUM - 1):
                (model(idx[:, :-1], targets=idx[:, 1:]).loss / ACCUM).backward()
        optimizer.step()
        optimizer.zero_grad()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    results[rank] = (reductions["count"], {k: v.detach().clone() for k, v in full.items()})
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradients_are_reduced_once_per_optimizer_step(strategy):
    from servers import free_port

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), strategy, results), nprocs=2, join=True)
    (count0, weights0), (count1, weights1) = results[0], results[1]
    assert count0 == count1 > 0
    per_step = count0 / STEPS
    assert per_step == int(per_step) and count0 < ACCUM * STEPS * (1 if strategy == "ddp" else 3)
    if strategy == "ddp":
        assert per_step <= 2  # one reduction of the bucket(s) per step, not one per micro-batch
    else:
        assert per_step == len(TINY_SHARDED_GROUPS)  # one reduce-scatter per sharded group per step
    for k in weights0:  # the replicas agree: every rank stepped with the same reduced gradients
        assert torch.allclose(weights0[k], weights1[k], atol=1e-6), k


TINY_SHARDED_GROUPS = range(TINY.n_layer + 1)
"""FSDP2 groups: one per block, and the root (embedding, final norm, head)."""
